#!/usr/bin/env python3
"""Where the sidecar's time goes on one of bench/run.py's configurations (default: every
feature on), measured two ways:

- perf: sampled CPU time of the sidecar process while oha sends a fixed rate for some
  seconds; the top functions by self time, with their share of the process's samples.
- callgrind: instructions executed for a fixed number of requests (the sidecar runs under
  valgrind, so time means nothing there, but instruction counts are stable on a noisy
  machine); the top functions by inclusive and by self instructions, and instructions per
  request.

Needs perf, valgrind and callgrind_annotate (Debian: linux-perf, valgrind), and the release
binaries (bench/run.sh builds them). Prints both reports; --out keeps the raw files.
"""

import argparse
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def load(oha, url, body_file, args):
    subprocess.run(
        [oha, url, *args, "-m", "POST", "-H", "content-type: application/json", "-D", str(body_file),
         "--no-tui", "--output-format", "json"],
        check=True, capture_output=True,
    )


def perf_profile(sidecar_pid, oha, url, body_file, seconds, rate, out):
    data = out / "perf.data"
    recorder = subprocess.Popen(
        ["perf", "record", "-F", "1999", "-o", str(data), "-p", str(sidecar_pid), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    load(oha, url, body_file, ["-z", f"{seconds}s", "-c", "64", "-q", str(rate)])
    recorder.wait()
    return subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio",
         "--percent-limit", "0.7"],
        capture_output=True, text=True, check=True,
    ).stdout


def callgrind_profile(tmp, name, up_port, oha, body_file, requests, out):
    settings, extra = bench.SIDECARS[name]
    port, admin = bench.free_port(), bench.free_port()
    profile = out / "callgrind.out"
    # Instrumentation starts once warmed up, so start-up (loading the tokenizer) is not counted.
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={profile}"]
    proc = start(tmp, name + "-callgrind", settings, extra, up_port, port, admin, valgrind)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        # Warm up (the tokenizer loads on a background thread, connections open), then count
        # only the measured requests.
        load(oha, url, body_file, ["-n", "200", "-c", "8"])
        time.sleep(5)
        load(oha, url, body_file, ["-n", "200", "-c", "8"])
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        load(oha, url, body_file, ["-n", str(requests), "-c", "8"])
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # The dump requested above, not the one written at exit.
    dumps = sorted(out.glob("callgrind.out.*"))
    profile = dumps[0] if dumps else profile
    report = []
    for inclusive in ("yes", "no"):
        report.append(subprocess.run(
            ["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=90", str(profile)],
            capture_output=True, text=True, check=True,
        ).stdout)
    return report


def start(tmp, name, settings, extra, up_port, port, admin, wrapper):
    """bench.start_sidecar under `wrapper` (valgrind, which takes a while to start it)."""
    real = bench.RELEASE / "llmesh-sidecar"
    script = tmp / f"{name}.sh"
    script.write_text("#!/bin/sh\nexec " + " ".join(wrapper) + f' {real} "$@"\n')
    script.chmod(0o755)
    return bench.start_sidecar(tmp, name, settings, extra, up_port, port, admin, binary=script,
                               start_timeout=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--oha", default=str(bench.ROOT / "bench" / ".tools" / "bin" / "oha"))
    parser.add_argument("--config", default="llmesh-features", choices=sorted(bench.SIDECARS))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=2000, help="requests measured by callgrind")
    parser.add_argument("--out", help="keep perf.data and the callgrind output here")
    args = parser.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="llmesh-profile-"))
    out = pathlib.Path(args.out) if args.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    body_file = tmp / "body.json"
    body_file.write_text(bench.json.dumps({
        "model": "chat", "messages": [{"role": "user", "content": bench.PROMPT}], "max_tokens": 64,
    }))
    up_port = bench.free_port()
    procs = [bench.start_fake_upstream(up_port)]
    try:
        settings, extra = bench.SIDECARS[args.config]
        port = bench.free_port()
        sidecar = bench.start_sidecar(tmp, args.config, settings, extra, up_port, port, bench.free_port())
        procs.append(sidecar)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        load(args.oha, url, body_file, ["-n", "500", "-c", "8"])
        time.sleep(1)
        print(f"## perf: {args.config}, {args.rate} req/s for {args.seconds} s, 64 connections\n")
        print(perf_profile(sidecar.pid, args.oha, url, body_file, args.seconds, args.rate, out))
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(timeout=15)
        procs.remove(sidecar)
        inclusive, exclusive = callgrind_profile(tmp, args.config, up_port, args.oha, body_file,
                                                 args.requests, out)
        print(f"## callgrind: {args.config}, {args.requests} requests, 8 connections (inclusive)\n")
        print(inclusive)
        print("## callgrind (self)\n")
        print(exclusive)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
