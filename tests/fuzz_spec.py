"""A mutation fuzzer for the spec parser: no input may raise anything but SpecError.

`python -m tests.fuzz_spec [COUNT] [SEED]` (default 1,000,000 inputs) mutates a corpus of valid
and invalid specs (byte flips, insertions of EDN-significant characters, deletions, truncations,
splices, duplications) and feeds each result to `parse_spec` and `parse_self_spec`. It prints a
summary line (inputs, accepted, rejected, seconds) and exits 1 on the first other exception,
printing the input. The hypothesis properties in tests/test_spec.py run in every CI run; this is
the long run the README's reliability figures come from.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from condo.errors import SpecError
from condo.spec import parse_self_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CORPUS = [
    b'{:spec {:Image "app:1"}}',
    b'{:spec {:Image "app:1" :Name "web" :Labels {"a" "b"}} :deploy [:After 5]}',
    b'{:spec {:Image "x" :HostConfig {:PortBindings {"80/tcp" [{:HostPort "8080"}]}}}'
    b" :health-timeout 3.5 :stop-timeout 0 :pull :always :stable-after 2}",
    b'{:Image "condo:1" :Env ["A=1"] :HostConfig {:Binds ["/a:/b"]}}',
    b'#{1 2} (1 2) [:a/b #inst "2020-01-01T00:00:00Z"'
    b' #uuid "00000000-0000-0000-0000-000000000000"]',
    b'{:spec {:Image "x"} ;; comment\n #_ ignored :deploy [:Before]}',
    b"{:spec {:Image \\a :Cmd [1N 1.5M -3 +4 1e3 nil true false sym ns/sym]}}",
    *(p.read_bytes() for p in sorted(EXAMPLES.glob("*.edn"))),
]
SIGNIFICANT = b"{}[]()#:;\"\\^@~`' \n,0123456789.-+/_eEnN"


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        pos = rng.randint(0, len(buf))
        if choice < 0.25 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randint(0, 255)
        elif choice < 0.5:
            buf[pos:pos] = bytes([rng.choice(SIGNIFICANT)]) * rng.randint(1, 3)
        elif choice < 0.65 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif choice < 0.75:
            del buf[pos:]
        elif choice < 0.9:
            other = rng.choice(CORPUS)
            start = rng.randint(0, len(other))
            buf[pos:pos] = other[start : start + rng.randint(1, 40)]
        else:
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 30)] * rng.randint(1, 4)
    return bytes(buf)


def main(count: int, seed: int) -> int:
    rng = random.Random(seed)
    accepted = rejected = 0
    started = time.monotonic()
    for n in range(count):
        data = mutate(rng, rng.choice(CORPUS))
        parse = parse_self_spec if n % 5 == 0 else parse_spec
        try:
            parse(data, "fuzz.edn")
            accepted += 1
        except SpecError:
            rejected += 1
        except Exception as exc:  # noqa: BLE001 -- the point: any other exception is a finding
            print(f"FOUND {type(exc).__name__}: {exc!r}\ninput: {data!r}", file=sys.stderr)
            return 1
    took = time.monotonic() - started
    print(
        f"fuzz_spec: {count} inputs, {accepted} accepted, {rejected} rejected, "
        f"0 other exceptions, {took:.0f} s, seed {seed}"
    )
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]) if args else 1_000_000, int(args[1]) if len(args) > 1 else 1))
