"""The official OpenAI Python SDK attaches to calls the gateway set up, with the gateway's id
and the backend's gateway key, as it would to OpenAI: `client.realtime.connect(call_id=...)`
and `client.live.sideband.connect(session_id=...)`. Run by e2e/tests/sideband.rs with the
project venv's Python (the SDK's `realtime` extra: `websockets`).

Usage:
  sideband.py realtime CALL_ID   update the session, ask for a response, see both answered
  sideband.py live SESSION_ID    see the session's usage reports
Environment: GATEWAY_BASE_URL (http://host:port/v1), BACKEND_KEY.
Prints one JSON object with what it saw; exits non-zero when a step surprises it.
"""

import json
import os
import sys

from openai import OpenAI


def client():
    return OpenAI(
        api_key=os.environ["BACKEND_KEY"],
        base_url=os.environ["GATEWAY_BASE_URL"],
        max_retries=0,
        timeout=20,
    )


def until(conn, kind, limit=200):
    """Raw events until one of type `kind` (others are skipped); that one, parsed."""
    for _ in range(limit):
        event = json.loads(conn.recv_bytes())
        if event.get("type") == kind:
            return event
    raise AssertionError(f"no {kind} in {limit} events")


def realtime(call_id):
    with client().realtime.connect(call_id=call_id, max_retries=0) as conn:
        conn.send({"type": "session.update", "session": {"type": "realtime", "instructions": "from the SDK"}})
        updated = until(conn, "session.updated")
        conn.send({"type": "response.create"})
        done = until(conn, "response.done")
    return {
        "instructions": updated["session"].get("instructions"),
        "response_status": done["response"]["status"],
        "total_tokens": done["response"]["usage"]["total_tokens"],
    }


def live(session_id):
    with client().live.sideband.connect(session_id=session_id, max_retries=0) as conn:
        usage = until(conn, "session.usage.updated")
    return {"seconds": usage["usage"]["seconds"]}


def main():
    mode, ident = sys.argv[1], sys.argv[2]
    out = realtime(ident) if mode == "realtime" else live(ident)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
