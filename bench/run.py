#!/usr/bin/env python3
"""Sidecar benchmark: direct to the fake upstream vs. through llmesh vs. through nginx.

Everything runs on loopback. Each round runs every scenario against every target back to
back (order rotated per round), so the targets share the machine's conditions and are
compared side by side. The script reports added latency (target minus direct in the same
round), throughput, CPU seconds per 10k requests and peak RSS of each proxy.

llmesh runs in four configurations (see SIDECARS): bare (no retries, no breaker, no
limits), the same with metrics turned off, with retries, breaker and local limits
configured but never triggered, and with the same limits shared through a real
redis-server. While llmesh (bare, metrics on) is under load, /metrics is scraped every
200 ms and the scrape times are reported.

Not run by default: llmesh-translated (the same endpoint called with Anthropic's Messages
API), and the response cache (docs/cache.md): llmesh-cache-hit, whose every request is a hit
(the same `temperature: 0` body each time), against nginx-static, nginx serving a file
holding the same answer; and llmesh-cache-miss, whose every request goes upstream and is
stored (`x-llmesh-cache: no-cache`: the lookup is skipped, the key, the recording and the
store are not), against llmesh.

Used by bench/run.sh, which installs the tools and builds the release binaries first.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RELEASE = ROOT / "target" / "release"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY = "sk-bench-not-a-real-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def proc_tree(pid):
    """The pid and its children (nginx workers)."""
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except FileNotFoundError:
        pass
    return pids


def cpu_seconds(pid):
    """User and system CPU seconds of a process tree. User time is the proxy's own code; system
    time is mostly loopback TCP, which every proxy pays alike."""
    user = system = 0
    for p in proc_tree(pid):
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError):
            pass
    return user / CLK_TCK, system / CLK_TCK


def memory_kb(pid, field):
    total = 0
    for p in proc_tree(pid):
        try:
            for line in pathlib.Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Scraper:
    """Scrapes /metrics every 200 ms on a thread until stopped; returns each scrape's time."""

    def __init__(self, url):
        import threading
        import urllib.request
        self.times = []
        self.done = threading.Event()

        def loop():
            while not self.done.wait(0.2):
                started = time.perf_counter()
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.times.append((time.perf_counter() - started) * 1000)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.times


class Target:
    def __init__(self, name, url, pid=None, body_file=None, headers=(), streams=True):
        self.name = name
        self.url = url
        self.pid = pid
        # The request body, when it is not the chat body every other target gets.
        self.body_file = body_file
        # Extra request headers ("name: value").
        self.headers = headers
        # Whether the stream client (which speaks chat completions, uncached) runs against it.
        self.streams = streams


def start_fake_upstream(port):
    proc = subprocess.Popen(
        [str(RELEASE / "llmesh-fake-upstream"), "--listen", f"127.0.0.1:{port}", "--threads", "1"],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


# Limits far above what the load reaches, so that admission does all its work (counting
# prompt tokens, taking from the buckets, holding a concurrency slot, settling usage) but
# never makes a request wait.
PRICE = "price: {inputPerMillionTokens: 0.15, outputPerMillionTokens: 0.6}"
UNTRIGGERED_LIMITS = "requestsPerMinute: 100000000, tokensPerMinute: 100000000000, maxConcurrent: 100000"
BARE = "retry: {maxAttempts: 1}\n    circuitBreaker: {consecutiveFailures: 0}"
# name: (endpoint settings, extra command-line arguments)
SIDECARS = {
    "llmesh": (BARE, []),
    "llmesh-nometrics": (BARE, ["--metrics", "false"]),
    "llmesh-limits": (f"retry: {{maxAttempts: 3}}\n    limits: {{{UNTRIGGERED_LIMITS}}}", []),
    # Every feature a production endpoint turns on, none of them triggered: retries and the
    # circuit breaker at their defaults, request, token (counted with gpt-4o-mini's o200k
    # tokenizer) and concurrency limits, a price, metrics and one JSON log line a request.
    # Issue 19's yardstick, against nginx proxying and logging every request.
    "llmesh-features": (f"limits: {{{UNTRIGGERED_LIMITS}}}\n    {PRICE}", []),
    # The same endpoint as llmesh, called with Anthropic's Messages API (/v1/messages):
    # request and answer are translated to and from the upstream's chat completions.
    "llmesh-translated": (BARE, []),
    "llmesh-redis": (
        "retry: {maxAttempts: 3}\n    limits: {" + UNTRIGGERED_LIMITS
        + ", scope: global, redis: {url: 'redis://127.0.0.1:REDIS_PORT'}}",
        [],
    ),
    # The response cache (docs/cache.md), called with CACHE_BODY: every request a hit ...
    "llmesh-cache-hit": (BARE + "\n    cache: {ttl: 1h}", []),
    # ... or, with `x-llmesh-cache: no-cache`, every request fetched and stored (identical
    # requests at once would otherwise be coalesced, and a tiny ttl would make them wait).
    "llmesh-cache-miss": (BARE + "\n    cache: {ttl: 1h}", []),
}
CACHE_TARGETS = {"llmesh-cache-hit", "llmesh-cache-miss", "nginx-static"}
# The least a hyper and tokio proxy costs (tests/testkit/src/bin/llmesh-floor-proxy.rs), with
# hyper-util's pooled client as the sidecar used, and with a plain stack of idle connections
# as it keeps now:
# what the sidecar's libraries take, apart from what its features add.
FLOORS = {"hyper-floor": "legacy", "hyper-floor-direct": "direct",
          # ... and direct plus what an LLM-aware proxy cannot skip: the JSON body read to find
          # and rewrite `model`, and a JSON log line per request (nginx logs each request too).
          "hyper-floor-json": "direct-json"}
OPT_IN = {"llmesh-translated", *CACHE_TARGETS, *FLOORS}
# Plain English, so that the tokenizer does the work it does on real prompts.
PROMPT = ("Summarise the quarterly report: revenue rose twelve percent while costs held steady, "
          "and the board approved the new hiring plan for the support team in Lisbon. ") * 6


def start_redis(tmp, port):
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def redis_lease_calls(port):
    """Scripts run by Redis so far: each is one lease or return round trip of a sidecar."""
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    calls = 0
    for line in out.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            calls += int(line.split("calls=", 1)[1].split(",", 1)[0])
    return calls


def start_sidecar(tmp, name, settings, extra_args, upstream_port, port, admin_port, binary=None,
                  start_timeout=10):
    key = tmp / "key"
    key.write_text(KEY)
    config = tmp / f"{name}.yaml"
    config.write_text(
        f"""endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: http://127.0.0.1:{upstream_port}/v1
    model: gpt-4o-mini
    default: true
    credential: {{file: {key}}}
    {settings}
"""
    )
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen(
        [
            str(binary or RELEASE / "llmesh-sidecar"),
            "--config", str(config),
            "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--log-format", "json",
            *extra_args,
        ],
        stdout=log,
        stderr=log,
    )
    wait_port(port, timeout=start_timeout)
    return proc


def start_floor_proxy(tmp, client, upstream_port, port):
    proc = subprocess.Popen([
        str(RELEASE / "llmesh-floor-proxy"), "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{upstream_port}", "--client", client,
        "--log", str(tmp / f"floor-{client}.log"),
    ])
    wait_port(port)
    return proc


def run_nginx(root, port, http_body):
    """nginx with its files under `root`, logging every request, serving `http_body` (the
    `http` block's directives after the common ones)."""
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
worker_processes auto;
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {root}/nginx-access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
{http_body}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def start_nginx(tmp, upstream_port, port):
    return run_nginx(tmp, port, f"""
    upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 32m;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {KEY}";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}""")


def start_nginx_static(tmp, answer, port):
    """nginx answering every request with the file `answer`, as a static file."""
    root = tmp / "nginx-static"
    root.mkdir(exist_ok=True)
    (root / "answer.json").write_bytes(answer)
    return run_nginx(root, port, f"""
    sendfile on;
    open_file_cache max=16;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 32m;
        default_type application/json;
        location / {{
            # The static module answers POST with 405: served as the file all the same.
            error_page 405 =200 /answer.json;
            rewrite ^ /answer.json break;
            root {root};
        }}
    }}""")


def fetch(url, body_file, headers=()):
    """The response body of one POST of `body_file`, and its x-llmesh-cache header."""
    import urllib.request
    request = urllib.request.Request(url, data=pathlib.Path(body_file).read_bytes(), method="POST")
    request.add_header("content-type", "application/json")
    for header in headers:
        name, value = header.split(":", 1)
        request.add_header(name.strip(), value.strip())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), response.headers.get("x-llmesh-cache")


def run_oha(oha, url, body_file, seconds, connections, rate, headers=()):
    args = [
        oha, url, "-z", f"{seconds}s", "-c", str(connections), "-m", "POST",
        "-H", "content-type: application/json", "-D", str(body_file),
        "--no-tui", "--output-format", "json",
    ]
    for header in headers:
        args += ["-H", header]
    if rate:
        args += ["-q", str(rate), "--latency-correction"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def summarize_oha(raw):
    pct = raw["latencyPercentiles"]
    codes = raw.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    total = sum(codes.values())
    return {
        "p50_ms": pct["p50"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "rps": raw["summary"]["requestsPerSec"],
        "requests": total,
        "ok": ok,
        # Requests still in flight when the run's time is up are cut off by oha, not failed.
        "errors": sum(n for e, n in raw.get("errorDistribution", {}).items() if e != "aborted due to deadline"),
    }


def requests_by_cache(metrics_url):
    """llmesh_requests_total summed by its cache label."""
    import re
    import urllib.request
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("llmesh_requests_total{"):
            cache = re.search(r'cache="([^"]*)"', line)
            key = cache.group(1) if cache else ""
            counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


STREAM_RUNS_PER_ROUND = 5


def run_stream_bench(url, streams, chunks, interval_ms):
    out = subprocess.run(
        [str(RELEASE / "llmesh-stream-bench"), "--url", url, "--streams", str(streams),
         "--chunks", str(chunks), "--interval-ms", str(interval_ms)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--oha", required=True)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rates", default="500,2000,0", help="0 means unlimited")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    default_proxies = [n for n in SIDECARS if n not in OPT_IN]
    parser.add_argument("--proxies", default=",".join([*default_proxies, "nginx"]),
                        help=f"which of {', '.join([*SIDECARS, 'nginx', 'nginx-static', *FLOORS])} to run")
    parser.add_argument("--baseline", metavar="BINARY",
                        help="another llmesh-sidecar build (say, of an older commit) to run side by side as "
                             "llmesh-baseline, with the endpoint alone: no retry, breaker or limits blocks, "
                             "so that builds which predate them accept the config")
    local_sidecars = [n for n in SIDECARS if n != "llmesh-redis" and n not in CACHE_TARGETS]
    parser.add_argument("--baseline-as", metavar="NAME", choices=local_sidecars,
                        help="run the --baseline build with this configuration instead (one of "
                             f"{', '.join(local_sidecars)}), to compare two builds on the same settings")
    args = parser.parse_args()
    proxies = args.proxies.split(",")
    if args.baseline:
        proxies.append("llmesh-baseline")

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    body_file = tmp / "body.json"
    body_file.write_text(json.dumps({
        "model": "chat",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
    }))
    # The same request, cacheable: it does not sample.
    cache_body_file = tmp / "cache-body.json"
    cache_body_file.write_text(json.dumps({**json.loads(body_file.read_text()), "temperature": 0}))
    messages_body_file = tmp / "messages-body.json"
    messages_body_file.write_text(json.dumps({
        "model": "chat",
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 64,
    }))
    up_port = free_port()
    path = "/v1/chat/completions"
    procs = []
    try:
        upstream = start_fake_upstream(up_port)
        procs.append(upstream)
        targets = [Target("direct", f"http://127.0.0.1:{up_port}{path}")]
        redis_port = None
        metrics_url = None
        cache_metrics = {}
        # nginx-static serves the cached answer, known once llmesh-cache-hit has stored it.
        if "nginx-static" in proxies and "llmesh-cache-hit" not in proxies:
            parser.error("nginx-static serves llmesh-cache-hit's answer: run both")
        for name in sorted(proxies, key=lambda n: n == "nginx-static"):
            port = free_port()
            if name == "nginx-static":
                hit_url = next(t.url for t in targets if t.name == "llmesh-cache-hit")
                answer, outcome = fetch(hit_url, cache_body_file)
                assert outcome == "hit-memory", f"llmesh-cache-hit answered with {outcome}"
                proc = start_nginx_static(tmp, answer, port)
                static = fetch(f"http://127.0.0.1:{port}{path}", cache_body_file)[0]
                assert static == answer, "nginx-static serves the cached answer"
                procs.append(proc)
                targets.append(Target(name, f"http://127.0.0.1:{port}{path}", proc.pid, cache_body_file,
                                      streams=False))
                continue
            if name == "nginx":
                proc = start_nginx(tmp, up_port, port)
            elif name in FLOORS:
                proc = start_floor_proxy(tmp, FLOORS[name], up_port, port)
            elif name == "llmesh-baseline":
                settings, extra_args = SIDECARS[args.baseline_as] if args.baseline_as else ("", [])
                proc = start_sidecar(tmp, name, settings, extra_args, up_port, port, free_port(),
                                     binary=args.baseline)
            else:
                settings, extra_args = SIDECARS[name]
                if "REDIS_PORT" in settings:
                    redis_port = free_port()
                    procs.append(start_redis(tmp, redis_port))
                    settings = settings.replace("REDIS_PORT", str(redis_port))
                admin_port = free_port()
                proc = start_sidecar(tmp, name, settings, extra_args, up_port, port, admin_port)
                if name == "llmesh":
                    metrics_url = f"http://127.0.0.1:{admin_port}/metrics"
                if name in CACHE_TARGETS:
                    cache_metrics[name] = f"http://127.0.0.1:{admin_port}/metrics"
            procs.append(proc)
            if name == "llmesh-translated":
                targets.append(Target(name, f"http://127.0.0.1:{port}/v1/messages", proc.pid,
                                      messages_body_file, streams=False))
            elif name in CACHE_TARGETS:
                url = f"http://127.0.0.1:{port}{path}"
                headers = ("x-llmesh-cache: no-cache",) if name == "llmesh-cache-miss" else ()
                # The first call stores the answer: from then on every hit target's call is a hit.
                assert fetch(url, cache_body_file, headers)[1] == "miss"
                targets.append(Target(name, url, proc.pid, cache_body_file, headers, streams=False))
            else:
                targets.append(Target(name, f"http://127.0.0.1:{port}{path}", proc.pid))
        time.sleep(0.5)
        idle_rss = {t.name: memory_kb(t.pid, "VmRSS") for t in targets if t.pid}
        load_before = pathlib.Path("/proc/loadavg").read_text().split()[:3]
        rates = [int(r) for r in args.rates.split(",")]
        results = {"rates": {}, "streaming": {}}
        scrape_ms = {}
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for rate in rates:
                for t in order:
                    cpu0 = cpu_seconds(t.pid) if t.pid else (0, 0)
                    leases0 = redis_lease_calls(redis_port) if t.name == "llmesh-redis" else 0
                    scraper = Scraper(metrics_url) if t.name == "llmesh" and metrics_url else None
                    raw = run_oha(args.oha, t.url, t.body_file or body_file, args.seconds,
                                  args.connections, rate, t.headers)
                    if scraper:
                        scrape_ms.setdefault(str(rate), []).extend(scraper.stop())
                    s = summarize_oha(raw)
                    if t.pid:
                        user, system = cpu_seconds(t.pid)
                        per_10k = 10_000 / max(s["requests"], 1)
                        s["user_cpu_s_per_10k"] = (user - cpu0[0]) * per_10k
                        s["system_cpu_s_per_10k"] = (system - cpu0[1]) * per_10k
                        s["cpu_s_per_10k"] = s["user_cpu_s_per_10k"] + s["system_cpu_s_per_10k"]
                    if t.name == "llmesh-redis":
                        s["redis_calls_per_10k"] = (redis_lease_calls(redis_port) - leases0) / max(s["requests"], 1) * 10_000
                    results["rates"].setdefault(str(rate), {}).setdefault(t.name, []).append(s)
                    print(f"round {rnd} rate {rate or 'max'} {t.name}: {json.dumps(s)}", file=sys.stderr)
            # A p99 of 100 streams is nearly their slowest one: several runs a round, the targets
            # taking turns, so that one unlucky run (or a slow run of direct's, which every
            # "added" figure subtracts) does not decide the median.
            for _ in range(STREAM_RUNS_PER_ROUND):
                for t in (t for t in order if t.streams):
                    r = run_stream_bench(t.url, 100, 200, 5)
                    results["streaming"].setdefault(t.name, []).append(r)
                    print(f"round {rnd} streaming {t.name}: {json.dumps(r)}", file=sys.stderr)
        peak_rss = {t.name: memory_kb(t.pid, "VmHWM") for t in targets if t.pid}
        # What the cache did, to check that the hit target's calls were hits and the miss
        # target's misses.
        cache_outcomes = {name: requests_by_cache(url) for name, url in cache_metrics.items()}
        load_after = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    report = build_report(results, [t.name for t in targets if t.pid], idle_rss, peak_rss, load_before,
                          load_after, args)
    report["cache_outcomes"] = cache_outcomes
    report["metrics_scrape_ms"] = {
        rate: {"scrapes": len(ms), "p50": statistics.median(ms), "max": max(ms)}
        for rate, ms in scrape_ms.items() if ms
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"raw": results, "report": report}, indent=2))
    print(render(report))
    shutil.rmtree(tmp, ignore_errors=True)


def build_report(results, proxies, idle_rss, peak_rss, load_before, load_after, args):
    report = {
        "machine": {"cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "connections": args.connections},
        "proxies": proxies,
        "memory_kb": {"idle_rss": idle_rss, "peak_rss": peak_rss},
        "rates": {},
        "streaming": {},
    }
    for rate, by_target in results["rates"].items():
        direct = by_target["direct"]
        row = {"direct": {"p50_ms": med(direct, "p50_ms"), "p99_ms": med(direct, "p99_ms"), "rps": med(direct, "rps")}}
        for name in proxies:
            runs = by_target[name]
            # Added latency: the proxy's percentile minus direct's, paired within each round.
            row[name] = {
                "p50_ms": med(runs, "p50_ms"),
                "p99_ms": med(runs, "p99_ms"),
                "added_p50_ms": statistics.median(r["p50_ms"] - d["p50_ms"] for r, d in zip(runs, direct)),
                "added_p99_ms": statistics.median(r["p99_ms"] - d["p99_ms"] for r, d in zip(runs, direct)),
                "rps": med(runs, "rps"),
                "cpu_s_per_10k": med(runs, "cpu_s_per_10k"),
                "user_cpu_s_per_10k": med(runs, "user_cpu_s_per_10k"),
                "non_2xx_or_errors": sum(r["requests"] - r["ok"] + r["errors"] for r in runs),
            }
            if "redis_calls_per_10k" in runs[0]:
                row[name]["redis_calls_per_10k"] = med(runs, "redis_calls_per_10k")
        report["rates"][rate] = row
    for name, runs in results["streaming"].items():
        report["streaming"][name] = {
            "ttft_p50_ms": statistics.median(r["ttft_ms"]["p50"] for r in runs),
            "ttft_p99_ms": statistics.median(r["ttft_ms"]["p99"] for r in runs),
            "completed": min(r["completed"] for r in runs),
            "events": min(r["events"] for r in runs),
            "frames_with_several_events": max(r["frames_with_several_events"] for r in runs),
        }
    return report


def render_against_nginx(report, name):
    """Issue 19's yardstick: `name`'s figures as ratios to nginx's in the same run (at or
    under 1 is the goal; throughput at or over 1)."""
    def ratio(ours, theirs):
        return f"{ours / theirs:.2f}×" if theirs > 0 else "n/a"

    lines = [f"| {name} vs nginx | {name} | nginx | ratio |", "| --- | --- | --- | --- |"]
    for rate, row in report["rates"].items():
        ours, theirs = row[name], row["nginx"]
        if rate == "0":
            lines.append(f"| max throughput (req/s) | {ours['rps']:.0f} | {theirs['rps']:.0f} | {ratio(ours['rps'], theirs['rps'])} |")
            continue
        for key, label in (("added_p50_ms", "added p50 (ms)"), ("added_p99_ms", "added p99 (ms)"),
                           ("cpu_s_per_10k", "CPU s / 10k req"), ("user_cpu_s_per_10k", "of which user")):
            lines.append(f"| {label} at {rate}/s | {ours[key]:.3f} | {theirs[key]:.3f} | {ratio(ours[key], theirs[key])} |")
    streams = report["streaming"]
    if name in streams and "nginx" in streams and "direct" in streams:
        direct = streams["direct"]
        for key, label in (("ttft_p50_ms", "added TTFT p50 (ms)"), ("ttft_p99_ms", "added TTFT p99 (ms)")):
            ours, theirs = streams[name][key] - direct[key], streams["nginx"][key] - direct[key]
            lines.append(f"| {label}, 100 streams at once | {ours:.2f} | {theirs:.2f} | {ratio(ours, theirs)} |")
    peak = report["memory_kb"]["peak_rss"]
    lines.append(f"| peak RSS (MiB) | {peak[name] / 1024:.1f} | {peak['nginx'] / 1024:.1f} | {ratio(peak[name], peak['nginx'])} |")
    return lines


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def render(report):
    lines = []
    m = report["memory_kb"]
    lines.append(f"load average before {report['machine']['loadavg_before']}, after {report['machine']['loadavg_after']}")
    lines.append("")
    lines.append("| rate | proxy | added p50 (ms) | added p99 (ms) | throughput (req/s) | CPU s / 10k req | of which user | failed |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rate, row in report["rates"].items():
        label = "unlimited" if rate == "0" else f"{rate}/s"
        d = row["direct"]
        lines.append(f"| {label} | direct | p50 {d['p50_ms']:.3f} | p99 {d['p99_ms']:.3f} | {d['rps']:.0f} | | | |")
        for name in report["proxies"]:
            r = row[name]
            lines.append(
                f"| {label} | {name} | {r['added_p50_ms']:.3f} | {r['added_p99_ms']:.3f} | {r['rps']:.0f} "
                f"| {r['cpu_s_per_10k']:.3f} | {r['user_cpu_s_per_10k']:.3f} | {r['non_2xx_or_errors']} |"
            )
    compared = [p for p in ("llmesh", *sorted(CACHE_TARGETS)) if p in report["proxies"]]
    if any(p in CACHE_TARGETS for p in compared):
        lines.append("")
        lines.append("| rate | target | p50 (ms) | p99 (ms) | throughput (req/s) | CPU s / 10k req | of which user |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for rate, row in report["rates"].items():
            label = "unlimited" if rate == "0" else f"{rate}/s"
            for name in compared:
                r = row[name]
                lines.append(
                    f"| {label} | {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rps']:.0f} "
                    f"| {r['cpu_s_per_10k']:.3f} | {r['user_cpu_s_per_10k']:.3f} |"
                )
        for name, counts in report.get("cache_outcomes", {}).items():
            lines.append(f"{name}: requests by x-llmesh-cache: {json.dumps(counts, sort_keys=True)}")
    for rate, s in report.get("metrics_scrape_ms", {}).items():
        label = "unlimited" if rate == "0" else f"{rate}/s"
        lines.append(f"/metrics scrape under load ({label}): {s['scrapes']} scrapes, p50 {s['p50']:.2f} ms, max {s['max']:.2f} ms")
    redis_rows = [(rate, row[p]["redis_calls_per_10k"]) for rate, row in report["rates"].items()
                  for p in report["proxies"] if "redis_calls_per_10k" in row[p]]
    if redis_rows:
        lines.append("")
        lines.append("Redis round trips (lease and return scripts) per 10k requests: " + ", ".join(
            f"{'unlimited' if rate == '0' else rate + '/s'}: {calls:.2f}" for rate, calls in redis_rows))
    lines.append("")
    lines.append("| memory (MiB) | " + " | ".join(report["proxies"]) + " |")
    lines.append("| --- |" + " --- |" * len(report["proxies"]))
    for kind in ("idle_rss", "peak_rss"):
        lines.append(f"| {kind.replace('_', ' ')} | " + " | ".join(f"{m[kind][p] / 1024:.1f}" for p in report["proxies"]) + " |")
    if "llmesh-features" in report["proxies"] and "nginx" in report["proxies"]:
        lines.append("")
        lines.extend(render_against_nginx(report, "llmesh-features"))
    lines.append("")
    lines.append("| streaming (100 × 200 chunks @ 5 ms) | TTFT p50 (ms) | TTFT p99 (ms) | completed | events | frames with >1 event |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, s in report["streaming"].items():
        lines.append(
            f"| {name} | {s['ttft_p50_ms']:.2f} | {s['ttft_p99_ms']:.2f} | {s['completed']} | {s['events']} | {s['frames_with_several_events']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
