"""The example agent for docker-compose: one allowed, one denied call through the gateway, with its own token.

It holds only its identity (a JWT minted here from the shared demo secret, as an identity provider would),
never an upstream key. Exit 0 when the gateway decided as rules/agents/invoice-bot.yaml says.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

from gateway.tokens import issue_token

GATEWAY = os.environ.get("GATEWAY_URL", "http://gateway:8080")


def call(method: str, path: str, token: str, body: object = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(GATEWAY + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = int(response.status)
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = int(error.code), error.read().decode()
    print(f"{method} {path} -> {status} {text[:200]}", flush=True)
    return status


def main() -> int:
    token = issue_token("invoice-bot", os.environ["AGENT_GATEWAY_JWT_SECRET"].encode(), 3600)
    for _ in range(30):  # the gateway may still be starting
        try:
            call("GET", "/erp/vendors", token)
            break
        except OSError:
            time.sleep(1)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Summarise invoice 42"}]}
    allowed = call("POST", "/openai/chat/completions", token, chat)
    denied = call("DELETE", "/erp/vendors/v-1", token)
    return 0 if (allowed, denied) == (200, 403) else 1


if __name__ == "__main__":
    sys.exit(main())
