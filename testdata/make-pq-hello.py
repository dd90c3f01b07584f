#!/usr/bin/env python3
"""Builds testdata/clienthello-pq.bin from the captured curl ClientHello:
its key_share is replaced by an X25519MLKEM768 share (1216 bytes, the size
Chrome and Firefox send) plus X25519, a GREASE extension and a GREASE
encrypted_client_hello (as Chrome sends without an ECH config) are added,
and the server_name extension is moved last, so the hello is about 1.8 KB
and the SNI sits past byte 1024, as in real post-quantum hellos. Deterministic: the share bytes are a counter."""
import struct, sys

src = open(sys.argv[1] if len(sys.argv) > 1 else "testdata/clienthello-curl.bin", "rb").read()
body = src[5 + 4:]  # skip record and handshake headers
p = 2 + 32  # version, random
sid_len = body[p]; p += 1 + sid_len
cs_len = struct.unpack(">H", body[p:p+2])[0]; p += 2 + cs_len
comp_len = body[p]; p += 1 + comp_len
prefix = body[:p]
ext_total = struct.unpack(">H", body[p:p+2])[0]; p += 2
exts, end = [], p + ext_total
while p < end:
    t, l = struct.unpack(">HH", body[p:p+4]); exts.append((t, body[p+4:p+4+l])); p += 4 + l
sni = [e for e in exts if e[0] == 0]
rest = [e for e in exts if e[0] not in (0, 0x33, 0x15)]  # drop SNI, key_share, padding
mlkem = bytes(i % 251 for i in range(1216))
x25519 = bytes(range(32))
shares = struct.pack(">HH", 0x11ec, len(mlkem)) + mlkem + struct.pack(">HH", 0x001d, 32) + x25519
key_share = (0x33, struct.pack(">H", len(shares)) + shares)
grease = (0x3a3a, b"\x00")
# ECH outer: type 0, HKDF-SHA256 / AES-128-GCM, config id, 32-byte enc, and
# a 208-byte payload.
payload = bytes((i * 7) % 256 for i in range(208))
ech = (0xfe0d, b"\x00" + struct.pack(">HH", 1, 1) + b"\x2a"
       + struct.pack(">H", 32) + bytes(range(32, 64))
       + struct.pack(">H", len(payload)) + payload)
new_exts = [grease] + rest + [ech, key_share] + sni
ext_bytes = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in new_exts)
hello = prefix + struct.pack(">H", len(ext_bytes)) + ext_bytes
msg = b"\x01" + struct.pack(">I", len(hello))[1:] + hello
record = b"\x16\x03\x01" + struct.pack(">H", len(msg)) + msg
open("testdata/clienthello-pq.bin", "wb").write(record)
print(len(record), "bytes; SNI at", record.find(b"api.example.test"))
