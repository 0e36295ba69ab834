"""The official OpenAI Python SDK against the gateway: a backend mints a client secret, a page
opens a call with it. Run by e2e/tests/client_secrets.rs with the project venv's Python.

Usage: client_secrets.py call|expiry OFFER_FILE
Environment: GATEWAY_BASE_URL (http://host:port/v1), BACKEND_KEY (the gateway's API key).
Prints one JSON object with what each step saw; exits non-zero when a step surprises it.
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

BASE = os.environ["GATEWAY_BASE_URL"]


def client(key):
    return OpenAI(api_key=key, base_url=BASE, max_retries=0, timeout=20)


def refusal(fn, kind):
    """Calls fn, which must raise the SDK's `kind` error; its status, code and param."""
    try:
        fn()
    except kind as e:
        return {"status": e.status_code, "code": e.code, "param": e.param}
    raise AssertionError(f"expected {kind.__name__}")


def call(offer):
    out = {}
    backend = client(os.environ["BACKEND_KEY"])
    secret = backend.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 600},
        session={
            "type": "realtime",
            "model": "gpt-realtime",
            "instructions": "from the backend",
        },
    )
    # The SDK parsed the answer into its own types.
    assert isinstance(secret, openai.types.realtime.ClientSecretCreateResponse)
    assert secret.value.startswith("ek_"), secret.value[:8]
    assert isinstance(secret.expires_at, int)
    out["secret"] = {
        "value": secret.value,
        "expires_at": secret.expires_at,
        "session": secret.session.model_dump(exclude_none=True),
        "session_class": type(secret.session).__name__,
        "now": int(time.time()),
    }
    page = client(secret.value)
    # What a page does: only the SDP, no model (the key names it), no real key.
    raw = page.realtime.calls.with_raw_response.create(sdp=offer)
    out["call"] = {
        "status": raw.status_code,
        "location": raw.headers.get("location"),
        "content_type": raw.headers.get("content-type"),
        "answer": raw.parse().text,
    }
    # The key opens its model only.
    out["other_model"] = refusal(
        lambda: page.realtime.calls.create(
            sdp=offer, session={"type": "realtime", "model": "gpt-realtime-mini"}
        ),
        openai.PermissionDeniedError,
    )
    # A page's key mints nothing, nor does a caller without a key; bounds are OpenAI's.
    out["key_mints"] = refusal(
        lambda: page.realtime.client_secrets.create(session={"type": "realtime"}),
        openai.PermissionDeniedError,
    )
    # (The SDK wants a key: the request goes without its Authorization.)
    out["anonymous_mints"] = refusal(
        lambda: backend.realtime.client_secrets.create(
            extra_headers={"Authorization": openai.omit}
        ),
        openai.AuthenticationError,
    )
    out["too_short"] = refusal(
        lambda: backend.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 5}
        ),
        openai.BadRequestError,
    )
    return out


def expiry(offer):
    backend = client(os.environ["BACKEND_KEY"])
    secret = backend.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 10},
        session={"type": "realtime", "model": "gpt-realtime"},
    )
    while time.time() < secret.expires_at + 0.5:
        time.sleep(0.25)
    return {
        "expired": refusal(
            lambda: client(secret.value).realtime.calls.create(sdp=offer),
            openai.AuthenticationError,
        )
    }


def main():
    mode, offer_file = sys.argv[1], sys.argv[2]
    with open(offer_file, encoding="utf-8") as f:
        offer = f.read()
    out = {"call": call, "expiry": expiry}[mode](offer)
    out["openai_version"] = openai.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
