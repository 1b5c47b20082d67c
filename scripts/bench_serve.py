"""Load benchmark of `qmtot serve` (see scripts/bench-serve): requests/s and p50/p99 latency
for 1, 8 and 64 concurrent clients, and one n = 8 request against 8 separate requests of the
same prompt (wall time and peak KV blocks, read from /metrics). Standard library only."""

import json
import statistics
import sys
import threading
import time
import urllib.request

base = sys.argv[1]
mode = sys.argv[2]


def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.1)

if mode == "clients":
    for clients in [1, 8, 64]:
        per_client = max(2, 64 // clients)
        latencies = []
        generated = []
        lock = threading.Lock()

        def run(c):
            for i in range(per_client):
                body = {"prompt": f"Question {c}.{i}: what does the liver do? Answer:", "max_tokens": 32,
                        "temperature": 0.7, "seed": c * 1000 + i}
                dt, out = post("/v1/completions", body)
                with lock:
                    latencies.append(dt)
                    generated.append(out["usage"]["completion_tokens"])

        t = time.perf_counter()
        threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(f"{clients:>3} clients x {per_client:>2} requests (<= 32 tokens, mean {statistics.mean(generated):4.1f}): "
              f"{len(latencies) / wall:6.2f} req/s, {sum(generated) / wall:7.1f} generated tok/s, "
              f"p50 {statistics.median(latencies):6.2f} s, p99 {p99:6.2f} s")
else:
    prompt = "A 60-year-old woman presents with fatigue, weight gain and cold intolerance. " * 12
    body = {"prompt": prompt, "max_tokens": 32, "temperature": 0.8, "seed": 5}
    if mode == "n8":
        dt, out = post("/v1/completions", dict(body, n=8))
        label = "one request, n = 8"
    else:
        results = []

        def one(i):
            results.append(post("/v1/completions", dict(body, seed=5 + i)))

        t = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        out = results[0][1]
        label = "8 separate requests" + (" (no prefix cache)" if mode == "separate-nocache" else "")
    print(f"{label:<40}: {dt:6.2f} s, prompt {out['usage']['prompt_tokens']} tokens, "
          f"peak KV blocks {metric('qmtot_kv_blocks_peak'):.0f}, tokens computed {metric('qmtot_computed_tokens_total'):.0f}, "
          f"cached {metric('qmtot_cached_tokens_total'):.0f}")
