"""The official OpenAI Python SDK against the gateway's GPT-Live sessions: create one with the
WebRTC transport, refuse what the gateway refuses, and hang one up. Run by
e2e/tests/live_sessions.rs with the project venv's Python; the test's str0m peer does the media
between the steps.

Usage:
  live.py create MODEL OFFER_FILE   client.live.create(session={"model": MODEL, ...},
                                    transport={"type": "webrtc", "sdp": <offer>})
  live.py refusals OFFER_FILE       what the gateway refuses, as the SDK raises it
  live.py hangup SESSION_ID         client.live.sessions.hangup(SESSION_ID)
Environment: GATEWAY_BASE_URL (http://host:port/v1), BACKEND_KEY (the gateway's API key).
Prints one JSON object with what each step saw; exits non-zero when a step surprises it.
"""

import json
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["GATEWAY_BASE_URL"]


def client():
    return OpenAI(api_key=os.environ["BACKEND_KEY"], base_url=BASE, max_retries=0, timeout=20)


def refusal(fn, kind):
    """Calls fn, which must raise the SDK's `kind` error; its status, code and param."""
    try:
        fn()
    except kind as e:
        return {"status": e.status_code, "code": e.code, "param": e.param}
    raise AssertionError(f"expected {kind.__name__}")


def create(model, offer):
    raw = client().live.with_raw_response.create(
        session={"model": model, "instructions": "from the SDK"},
        transport={"type": "webrtc", "sdp": offer},
    )
    created = raw.parse()
    # The SDK parsed the answer into its own type: the id as issued, the answer SDP.
    assert isinstance(created, openai.types.live.LiveCreateResponse), type(created)
    assert created.transport.type == "webrtc"
    return {
        "status": raw.status_code,
        "content_type": raw.headers.get("content-type"),
        "session_id": created.session.id,
        "answer": created.transport.sdp,
    }


def refusals(offer):
    c = client()
    out = {}
    # A Realtime model is not served on the Live path.
    out["realtime_model"] = refusal(
        lambda: c.live.create(
            session={"model": "gpt-realtime"}, transport={"type": "webrtc", "sdp": offer}
        ),
        openai.NotFoundError,
    )
    # An offer that is not SDP.
    out["bad_sdp"] = refusal(
        lambda: c.live.create(
            session={"model": "gpt-live-1"}, transport={"type": "webrtc", "sdp": "hello"}
        ),
        openai.BadRequestError,
    )
    # SIP controls on a WebRTC session, and forking the provider's stored session.
    sid = "live_0123456789abcdef0123456789abcdef"
    out["accept"] = refusal(
        lambda: c.live.sessions.accept(sid, session={"type": "live", "model": "gpt-live-1"}),
        openai.BadRequestError,
    )
    out["reject"] = refusal(
        lambda: c.live.sessions.reject(sid, status_code=486), openai.BadRequestError
    )
    out["fork"] = refusal(
        lambda: c.live.sessions.fork(sid, transport={"type": "webrtc", "sdp": offer}),
        openai.BadRequestError,
    )
    # A session nobody created.
    out["unknown_hangup"] = refusal(
        lambda: c.live.sessions.hangup(sid), openai.NotFoundError
    )
    return out


def hangup(session_id):
    raw = client().live.sessions.with_raw_response.hangup(session_id)
    return {"status": raw.status_code}


def main():
    mode = sys.argv[1]
    if mode == "create":
        with open(sys.argv[3]) as f:
            out = create(sys.argv[2], f.read())
    elif mode == "refusals":
        with open(sys.argv[2]) as f:
            out = refusals(f.read())
    elif mode == "hangup":
        out = hangup(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
