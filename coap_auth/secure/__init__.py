"""The protected channel: EDHOC (RFC 9528) establishes OSCORE (RFC 8613) security contexts.

One package for both ends (DESIGN.md "Security architecture"): the AS's responder, context
table and OSCORE site (used by coap_auth.coap), and a device's initiator (device_client).

- credentials.py: EDHOC credentials (CCS); pure, no aiocoap, so the service may use it;
- contexts.py: OSCORE contexts and the bounded table a server finds them in;
- edhoc.py: the responder and the initiator, on lakers-python (imported only when a
  handshake runs: lakers has no 32-bit ARM wheel, and the rest stays importable there);
- site.py: the server site that unprotects requests and protects their responses.

It imports no store, service, settings or CLI. This file imports nothing, so that importing
credentials.py pulls in no transport.
"""
