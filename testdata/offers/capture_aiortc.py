"""Prints the SDP offer aiortc makes for a call like the gateway's clients make: one audio
track (send and receive) and the `oai-events` data channel, host candidates gathered.

Seeds the fuzz corpora with an offer from a WebRTC stack other than str0m and Chromium
(testdata/offers/README.md). Run it in a throwaway venv:

    python3 -m venv /tmp/aiortc && /tmp/aiortc/bin/pip install aiortc==1.16.0
    /tmp/aiortc/bin/python testdata/offers/capture_aiortc.py > testdata/offers/aiortc-1.16.0.sdp

No network is used beyond enumerating local interfaces (no STUN server is configured).
"""

import asyncio

from aiortc import RTCConfiguration, RTCPeerConnection


async def main() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    print(pc.localDescription.sdp, end="")
    await pc.close()


asyncio.run(main())
