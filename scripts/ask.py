#!/usr/bin/env python3
"""Asks a `cartridge serve` a question through OpenAI's chat completions API, with the Python
standard library alone, and prints the answer as it streams in.

    scripts/ask.py http://127.0.0.1:8000 "Who built the lighthouse?" --cartridge demo/varn@v1
"""
import argparse
import json
import sys
import urllib.error
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("question")
    parser.add_argument("--cartridge", action="append", default=[],
                        help="a cartridge reference, composed in the order given (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    body = {
        "messages": [{"role": "user", "content": args.question}],
        "cartridges": [{"id": ref} for ref in args.cartridge],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
    }
    request = urllib.request.Request(
        args.url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            for line in response:
                data = line.decode().strip().removeprefix("data: ")
                if not line.startswith(b"data: ") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for choice in chunk["choices"]:
                    print(choice["delta"].get("content", ""), end="", flush=True)
    except urllib.error.HTTPError as error:
        print(f"error: {json.load(error)['error']['message']}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
