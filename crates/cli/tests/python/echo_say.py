#!/usr/bin/env python3
"""One call of portcullis.demo.v1.Echo/Say from a standard gRPC client (grpcio), with mTLS and
a device certificate, as an outside client would make it: plain gRPC over ALPN h2, no
Portcullis Prefix.

Only `grpcio` is needed: the request and reply are encoded by hand (protobuf wire format).

    python3 echo_say.py --target 127.0.0.1:50051 --ca ca.pem \
        --cert devices/laptop.pem --key devices/laptop-key.pem [--text hello]
    python3 echo_say.py --target 127.0.0.1:50051 --plaintext   # no TLS (h2c), as a mistake

Prints one JSON line and exits 0 whether the call succeeded or not:
    {"ok": true, "reply": {"text": ..., "user": ..., "device": ..., "auth_method": ...}}
    {"ok": false, "code": "UNAUTHENTICATED", "details": "...", "metadata": {...}}
Exits 2 when grpcio cannot be imported.
"""

import argparse
import json
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_say_request(text):
    data = text.encode("utf-8")
    # field 1, wire type 2 (length-delimited): tag 0x0a
    return b"\x0a" + varint(len(data)) + data


def read_varint(buf, i):
    shift = 0
    value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def decode_say_reply(buf):
    names = {1: "text", 2: "user", 3: "device", 4: "auth_method"}
    reply = {name: "" for name in names.values()}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, i = read_varint(buf, i)
            value = bytes(buf[i : i + length])
            i += length
            if field in names:
                reply[names[field]] = value.decode("utf-8")
        elif wire == 0:
            _, i = read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
    return reply


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of portcullis serve")
    parser.add_argument("--ca", help="CA certificate (PEM) of the server")
    parser.add_argument("--cert", help="device certificate (PEM)")
    parser.add_argument("--key", help="device key (PEM)")
    parser.add_argument(
        "--plaintext", action="store_true", help="connect without TLS (h2c), as grpcurl -plaintext"
    )
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--text", default="hello")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    if not args.plaintext and not (args.ca and args.cert and args.key):
        parser.error("--ca, --cert and --key are required unless --plaintext is given")

    try:
        import grpc
    except ImportError as e:
        print(json.dumps({"ok": False, "code": "IMPORT_ERROR", "details": str(e)}))
        return 2

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    if args.plaintext:
        channel = grpc.insecure_channel(args.target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca),
            private_key=read(args.key),
            certificate_chain=read(args.cert),
        )
        options = [("grpc.ssl_target_name_override", args.server_name)]
        channel = grpc.secure_channel(args.target, credentials, options=options)
    with channel:
        say = channel.unary_unary(
            "/portcullis.demo.v1.Echo/Say",
            request_serializer=lambda text: encode_say_request(text),
            response_deserializer=lambda data: decode_say_reply(data),
        )
        try:
            reply = say(args.text, timeout=args.timeout)
            print(json.dumps({"ok": True, "reply": reply}))
        except grpc.RpcError as e:
            metadata = {k: v for k, v in (e.trailing_metadata() or ())}
            print(
                json.dumps(
                    {
                        "ok": False,
                        "code": e.code().name,
                        "details": e.details(),
                        "metadata": metadata,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
