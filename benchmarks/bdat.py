"""
BDAT against DATA outbound, on workload ii (200 messages of 1 MB over 5
parallel sessions, smtp-source → smtprelay → sink), in one run.

smtp-sink does not offer CHUNKING, so the sink here is a small asyncio
server (this file with --sink) that offers PIPELINING and CHUNKING, reads
DATA bodies up to their dot and BDAT chunks by their size, and counts the
messages.  The relay runs twice per round with one target setting changed:
`chunking yes` (the body goes as BDAT chunks) and `chunking no` (DATA,
dot-stuffed).  Prints msg/s per run and the BDAT/DATA ratio of the means;
asserts nothing.

    python3 benchmarks/bdat.py [--rounds 3] [--twistd .venv/bin/twistd]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = """hostname bench.test
smtp tcp://{host}:{listen} {{
    max_connections 1000
    max_connections_per_ip 1000
    max_message_size 64M
    deliver_to smtp tcp://{host}:{sink} {{
        chunking {chunking}
    }}
}}
"""


# ------------------------------------------------------------------ sink --

async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: list[int]) -> None:
    writer.write(b"220 sink.test ESMTP\r\n")
    while line := await reader.readline():
        verb, _, argument = line.strip().partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
                         b"250 CHUNKING\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            count[0] += 1
            writer.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"BDAT":
            size, _, last = argument.partition(b" ")
            await reader.readexactly(int(size))
            if last.upper() == b"LAST":
                count[0] += 1
            writer.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 2.0.0 Bye\r\n")
            break
        else:
            writer.write(b"250 2.0.0 Ok\r\n")
        await writer.drain()
    writer.close()


async def sink(port: int) -> None:
    count = [0]
    server = await asyncio.start_server(lambda r, w: session(r, w, count), HOST, port, limit=8 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(count[0], flush=True))
    async with server:
        await stop


# ------------------------------------------------------------- harness --

def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def waitForPort(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def sinkCount(proc: subprocess.Popen, out: str) -> int:
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    with open(out) as f:
        return int(f.read().split()[-1])


def run(twistd: str, chunking: str, sinkPort: int, work: str) -> float:
    listen = freePort()
    config = os.path.join(work, f"relay-{chunking}.conf")
    with open(config, "w") as f:
        f.write(CONFIG.format(host=HOST, listen=listen, sink=sinkPort, chunking=chunking))
    with open(os.path.join(work, f"relay-{chunking}.log"), "ab") as log:
        relay = subprocess.Popen([twistd, "-n", "--pidfile=", "smtprelay", "--config", config],
                                 stdout=log, stderr=log)
    try:
        waitForPort(listen)
        started = time.perf_counter()
        subprocess.run(["smtp-source", "-s", "5", "-m", "200", "-l", "1048576", "-d",
                        "-f", "a@bench.test", "-t", "b@bench.test", f"{HOST}:{listen}"], check=True)
        return 200 / (time.perf_counter() - started)
    finally:
        relay.terminate()
        relay.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--twistd", default=os.path.join(HERE, os.pardir, ".venv", "bin", "twistd"))
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(sink(args.sink))
        return
    if shutil.which("smtp-source") is None:
        raise SystemExit("needs Postfix's smtp-source (apt install postfix)")
    work = tempfile.mkdtemp(prefix="bdat-bench-")
    sinkPort = freePort()
    out = os.path.join(work, "sink.out")
    with open(out, "w") as f:
        sinkProc = subprocess.Popen([sys.executable, __file__, "--sink", str(sinkPort)], stdout=f)
    try:
        waitForPort(sinkPort)
        rates: dict[str, list[float]] = {"yes": [], "no": []}
        expected = 0
        for _ in range(args.rounds):
            for chunking in ("yes", "no"):
                rate = run(args.twistd, chunking, sinkPort, work)
                expected += 200
                delivered = sinkCount(sinkProc, out)
                if delivered != expected:
                    raise SystemExit(f"the sink counted {delivered} messages, expected {expected}")
                rates[chunking].append(rate)
                print(f"chunking {chunking:3}: {rate:7.1f} msg/s", flush=True)
        bdat, data = statistics.mean(rates["yes"]), statistics.mean(rates["no"])
        print(f"workload ii, mean of {args.rounds}: BDAT {bdat:.1f} msg/s, DATA {data:.1f} msg/s, "
              f"BDAT/DATA {bdat / data:.2f}")
    finally:
        sinkProc.terminate()
        sinkProc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
