#!/usr/bin/env python3
"""Micro-benchmarks for bay (issue 7), everything on loopback, each as a ratio from one run.

  announce  bay-tracker's /announce against opentracker (Debian build: whitelist mode), same
            wrk settings, a generated Lua script that spreads announces over --hashes info
            hashes x --peers peers (distinct peer_id and port each; 1 in 8 a seed, the rest
            leechers with pieces, numwant=50, compact). Both trackers are first filled by one
            sequential pass over every (info hash, peer), whose answers are checked.
  blob      a --blob-size random blob in docker-registry (filesystem storage), pulled once
            through a bay-proxy (tracker + swarm) so it is cached; then --streams concurrent
            curl clients each GET it --gets times, from the proxy and from the registry.
  manifest  wrk GET /v2/<repo>/manifests/<tag> (schema 2 Accept) through the proxy (its
            --default-upstream is the registry) and directly; p50/p99 and the added ms.
  rss       a fresh bay-proxy with a fresh tracker, a --rss-size blob in the registry, one
            client GET through the proxy (the tracker fetches and seeds, the proxy downloads via
            BitTorrent and streams), then VmHWM from /proc/<pid>/status; the peak is reset
            (clear_refs 5) and a second GET is served from the cache.

The set runs --runs times; the report gives each run's value and the median. Servers are
pinned to CPU 0 and load generators (wrk, curl) to CPU 1 unless --no-pin. Run it through
bench/micro.sh (tool check, hard time limit, tidy-up even if this process is killed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
REPO = "bench/micro"
TAG = "latest"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar"
# One loopback address per role (127.0.0.0/24 is not used by the test fixtures, which take
# 127.<1+pid/256>.<pid%256>.x).
IP = {
    "registry": "127.0.0.50",
    "opentracker": "127.0.0.51",
    "announce_tracker": "127.0.0.52",
    "tracker": "127.0.0.53",
    "proxy": "127.0.0.54",
    "rss_proxy": "127.0.0.55",
}
REGISTRY_PORT = 5000
TRACKER_PORT = 6880
TRACKER_PEER_PORT = 6881
OPENTRACKER_PORT = 6969
PROXY_PORT = 5000
TESTS = ("announce", "blob", "manifest", "rss")
BUILD_COMMANDS = {"rustc", "cargo", "cc", "cc1", "ld", "ld.lld", "rust-lld", "collect2", "clippy-driver",
                  "cargo-clippy", "rustdoc", "ld.bfd", "ld.gold", "mold"}


class Abort(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(argv, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_start_ticks(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, RssFile, ...), in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            v = v.split()
            if len(v) == 2 and v[1] == "kB":
                out[k] = int(v[0]) * 1024
    except OSError:
        pass
    return out


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_jiffies() -> tuple[int, int, int, int]:
    """(busy, total, irq + softirq, steal) jiffies of all CPUs since boot; busy excludes steal
    (time the hypervisor gave this VM's CPUs to someone else)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(v)
    idle = v[3] + v[4]
    return total - idle - v[7], total, v[5] + v[6], v[7]


def builds_running() -> list[str]:
    """Names of compiler/linker processes on the machine right now (the shared-machine check)."""
    seen = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if comm in BUILD_COMMANDS or comm.startswith("rustc"):
                seen.add(comm)
    return sorted(seen)


def ensure_free(ip: str, port: int, what: str) -> None:
    """Fails unless ip:port can be bound: something else listening there would answer instead."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            raise RuntimeError(f"{ip}:{port} for {what} is taken ({e}); is an earlier run still going?")


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Window:
    """What else used the machine while one measurement ran: samples /proc/stat and looks for
    compilers once a second. `close` returns the share of CPU time other processes took, as a
    range: busy time minus this benchmark's processes (`servers_cpu` plus the waited-for
    clients) is the upper bound, minus irq/softirq too the lower one (the kernel charges part of
    the loopback softirq work to the processes themselves); and the hypervisor's steal."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.j0 = cpu_jiffies()
        self.c0 = children_cpu()
        self.builds: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stop.is_set():
            self.builds.update(builds_running())
            self.stop.wait(1.0)

    def close(self, servers_cpu: float) -> dict:
        self.stop.set()
        self.thread.join()
        j1 = cpu_jiffies()
        wall = time.monotonic() - self.t0
        busy = (j1[0] - self.j0[0]) / CLK_TCK
        total = (j1[1] - self.j0[1]) / CLK_TCK
        irq = (j1[2] - self.j0[2]) / CLK_TCK
        steal = (j1[3] - self.j0[3]) / CLK_TCK
        clients = children_cpu() - self.c0
        others = max(0.0, busy - irq - clients - servers_cpu)
        others_upper = max(0.0, busy - clients - servers_cpu)
        pct = lambda x: round(100 * x / total, 1) if total else None
        return {"wall_s": round(wall, 3), "cpu_busy_pct": pct(busy), "servers_cpu_s": round(servers_cpu, 3),
                "clients_cpu_s": round(clients, 3), "irq_cpu_s": round(irq, 3), "others_cpu_pct": pct(others),
                "others_cpu_pct_upper": pct(others_upper), "steal_pct": pct(steal),
                "builds_seen": sorted(self.builds)}


# ---------------------------------------------------------------------------------------------
# wrk scripts (generated into the scratch dir)

LUA_COMMON = r"""
threads = {}
next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function done(summary, latency, requests)
  local failures, answers = 0, 0
  for _, t in ipairs(threads) do
    failures = failures + (t:get("failures") or 0)
    answers = answers + (t:get("answers") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'MICRO_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"lat_p50_us":%.1f,"lat_p90_us":%.1f,"lat_p99_us":%.1f,'
    .. '"lat_mean_us":%.1f,"lat_max_us":%.1f,"failures":%d,"answers":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    failures, answers))
end
"""

# args: hashes file, peers per hash, number of threads
LUA_ANNOUNCE = r"""
local hashes = {}
local H, P, nthreads = 0, 0, 1
local counter = 0
failures, answers = 0, 0

function init(args)
  for line in io.lines(args[1]) do
    hashes[#hashes + 1] = (line:gsub("..", "%%%0"))
  end
  H = #hashes
  P = tonumber(args[2])
  nthreads = tonumber(args[3])
  counter = id
  marker = args[4]
  math.randomseed(4242 + 7919 * id)
end

-- Peer p of torrent h: its own peer_id and port; p % 8 == 0 is a seed, the others are
-- leechers that already have pieces (so bay hands them every live peer, like opentracker).
local function announce(h, p)
  local downloaded, left
  if p % 8 == 0 then
    downloaded, left = 1048576, 0
  else
    downloaded = 1 + (p * 7919) % 1048575
    left = 1048576 - downloaded
  end
  return "/announce?info_hash=" .. hashes[h + 1]
    .. "&peer_id=-BM0001-" .. string.format("%012d", h * P + p)
    .. "&port=" .. (10000 + p)
    .. "&uploaded=0&downloaded=" .. downloaded .. "&left=" .. left
    .. "&compact=1&numwant=50"
end
"""

LUA_RANDOM = r"""
function request()
  return wrk.format("GET", announce(math.random(0, H - 1), math.random(0, P - 1)))
end
"""

# The fill pass: every (h, p) once, in order, split over the threads; each answer is checked
# (a bencoded dict with peers, no failure reason) and the thread stops after its share.
LUA_FILL = r"""
local quota = -1
function request()
  local i = counter % (H * P)
  counter = counter + nthreads
  return wrk.format("GET", announce(i % H, math.floor(i / H)))
end
function response(status, headers, body)
  if quota < 0 then quota = math.floor((H * P - id + nthreads - 1) / nthreads) end
  answers = answers + 1
  if status ~= 200 or body:find("failure reason", 1, true) or not body:find("5:peers", 1, true) then
    failures = failures + 1
    if failures <= 3 then
      local f = io.open(marker .. "bad-" .. id .. "-" .. failures, "w")
      f:write(status .. "\n" .. body)
      f:close()
    end
  end
  if answers == quota then
    local f = io.open(marker .. id, "w")
    f:write(failures)
    f:close()
    wrk.thread:stop()
  end
end
"""


# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.timeout
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bay-micro."))
        self.own_work = not args.work_dir
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pidfile = self.work / "pids"
        self.bin = Path(args.bin_dir)
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("BAY_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
                    and k != "RUST_LOG"}
        self.env.update({"NO_PROXY": "*", "no_proxy": "*", "NO_COLOR": "1"})
        self.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
        self.registry = None
        self.blobs: dict[str, dict] = {}
        self.manifest_digest = None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    # -- processes -------------------------------------------------------------------------

    def server_argv(self, argv):
        return ["taskset", "-c", "0", *argv] if self.pin else argv

    def client_argv(self, argv):
        return ["taskset", "-c", "1", *argv] if self.pin else argv

    def spawn(self, name: str, argv: list, log_name: str | None = None, server=True, cwd=None,
              stdout=None) -> subprocess.Popen:
        """Starts a process in its own session (so Ctrl-C reaches only us; we stop it) and
        records its PID and start time for micro.sh's last-resort tidy-up."""
        argv = [str(a) for a in (self.server_argv(argv) if server else self.client_argv(argv))]
        if stdout is None:
            logf = open(self.logs / (log_name or f"{name}.log"), "ab")
            out, err = logf, subprocess.STDOUT
        else:
            logf, out, err = None, stdout, open(self.logs / (log_name or f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env,
                             start_new_session=True, cwd=cwd)
        for f in (logf, err if stdout is not None else None):
            if f is not None and f is not subprocess.STDOUT:
                f.close()
        self.procs[p.pid] = (name, p)
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid} {proc_start_ticks(p.pid)} {name}\n")
        return p

    def stop(self, p: subprocess.Popen | None, grace: float = 5.0) -> None:
        if p is None:
            return
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        self.procs.pop(p.pid, None)

    def cleanup(self) -> None:
        for pid, (name, p) in list(self.procs.items()):
            if p.poll() is None:
                try:
                    p.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for pid, (name, p) in list(self.procs.items()):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    log(f"cleanup: {name} (pid {pid}) did not exit")
        self.procs.clear()
        if self.own_work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        elif self.args.keep_work:
            log(f"scratch kept in {self.work}")

    def http(self, url: str, method="GET", headers=None, timeout=5.0) -> tuple[int, bytes, dict]:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            return r.status, body, {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    def wait_http(self, url: str, proc: subprocess.Popen, what: str, timeout=60.0, ok=(200,)) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready; "
                                   f"log: {self.tail(what)}")
            try:
                code = self.http(url, timeout=2)[0]
                if code in ok:
                    return
                last = code
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({url} -> {last})")
            time.sleep(0.1)

    def tail(self, name: str, n=15) -> str:
        try:
            lines = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"

    def wait_quiet(self, what: str) -> dict:
        """Waits (up to --quiet-wait s) until no compiler runs and the CPU is < 25 % busy."""
        t0 = time.monotonic()
        waited_for = set()
        while True:
            b0 = cpu_jiffies()
            time.sleep(2)
            b1 = cpu_jiffies()
            busy = 100 * (b1[0] - b0[0] + b1[3] - b0[3]) / max(1, b1[1] - b0[1])
            builds = builds_running()
            if not builds and busy < 25:
                break
            waited_for.update(builds)
            if time.monotonic() - t0 > min(self.args.quiet_wait, self.time_left() - 900):
                log(f"{what}: machine still busy after {self.args.quiet_wait:.0f} s "
                    f"({busy:.0f} % CPU, {', '.join(builds) or 'no compiler'}); measuring anyway")
                break
        waited = time.monotonic() - t0
        if waited > 5:
            log(f"{what}: waited {waited:.0f} s for a quiet machine ({', '.join(sorted(waited_for)) or 'busy CPU'})")
        return {"waited_s": round(waited, 1), "busy_with": sorted(waited_for)}

    def measured(self, what: str, measure) -> dict:
        """Waits for a quiet machine, runs `measure()` (which returns a dict with the Window's
        "machine" entry), and repeats it up to --retries times while other processes took more
        than --busy-limit % of the CPU or a compiler ran meanwhile; keeps the least disturbed
        attempt."""
        best = None
        attempts = []
        for attempt in range(1 + self.args.retries):
            quiet = self.wait_quiet(what)
            r = measure()
            r["quiet"] = quiet
            m = r["machine"]
            others = (m.get("others_cpu_pct") or 0.0) + (m.get("steal_pct") or 0.0)
            attempts.append({"others_cpu_pct": m.get("others_cpu_pct"), "steal_pct": m.get("steal_pct"),
                             "builds_seen": m.get("builds_seen")})
            disturbed = others > self.args.busy_limit or bool(m.get("builds_seen"))
            score = (bool(m.get("builds_seen")), others)
            if best is None or score < best[0]:
                best = (score, r)
            if not disturbed:
                break
            if self.time_left() < 900:
                log(f"  {what}: disturbed, but too little of the time limit is left to measure again")
                break
            if attempt < self.args.retries:
                log(f"  {what}: disturbed (other processes + steal {others:.0f} % CPU"
                    f"{', ' + '/'.join(m['builds_seen']) + ' running' if m.get('builds_seen') else ''}); measuring again")
        r = best[1]
        r["attempts"] = attempts
        return r

    # -- services --------------------------------------------------------------------------

    def start_registry(self) -> None:
        d = self.work / "registry"
        (d / "data").mkdir(parents=True)
        url = f"http://{IP['registry']}:{REGISTRY_PORT}"
        # Debian's stock config (filesystem storage, in-memory blob descriptor cache) with the
        # access log off and warn level, so the registry spends nothing on per-request logging.
        (d / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: \"{d / 'data'}\"\n  delete:\n    enabled: true\n"
            "  cache:\n    blobdescriptor: inmemory\n"
            f"http:\n  addr: \"{IP['registry']}:{REGISTRY_PORT}\"\n  secret: bay-micro\n")
        ensure_free(IP["registry"], REGISTRY_PORT, "docker-registry")
        self.registry = self.spawn("docker-registry", ["docker-registry", "serve", d / "config.yml"])
        self.registry_url = url
        self.wait_http(f"{url}/v2/", self.registry, "docker-registry", 30)
        log(f"docker-registry up at {url} (pid {self.registry.pid})")

    def start_tracker(self, ip: str, name: str) -> tuple[subprocess.Popen, Path]:
        data = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        argv = [self.bin / "bay-tracker", "--listen", f"{ip}:{TRACKER_PORT}", "--peer-port", TRACKER_PEER_PORT,
                "--peer-ip", ip, "--upstream", f"http://{IP['registry']}:{REGISTRY_PORT}", "--data-dir", data]
        ensure_free(ip, TRACKER_PORT, name)
        p = self.spawn(name, argv)
        self.wait_http(f"http://{ip}:{TRACKER_PORT}/healthz", p, name)
        return p, data

    def start_proxy(self, ip: str, name: str, tracker_ip: str) -> tuple[subprocess.Popen, Path]:
        data = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        up = f"http://{IP['registry']}:{REGISTRY_PORT}"
        argv = [self.bin / "bay-proxy", "--listen", f"{ip}:{PROXY_PORT}", "--peer-port", free_port("0.0.0.0"), "--exchange-port", "0",
                "--data-dir", data, "--upstream", up, "--default-upstream", up,
                "--tracker", f"http://{tracker_ip}:{TRACKER_PORT}"]
        ensure_free(ip, PROXY_PORT, name)
        p = self.spawn(name, argv)
        self.wait_http(f"http://{ip}:{PROXY_PORT}/_bay/healthz", p, name)
        return p, data

    def stop_and_remove(self, p, data: Path | None) -> None:
        self.stop(p)
        if data is not None:
            shutil.rmtree(data, ignore_errors=True)

    # -- content ---------------------------------------------------------------------------

    def make_blob(self, size: int, label: str) -> dict:
        """Writes `size` random bytes to a scratch file, pushes them as a blob of REPO, deletes
        the file. Returns the descriptor."""
        path = self.work / f"{label}.bin"
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                b = os.urandom(min(left, 4 * MiB))
                h.update(b)
                f.write(b)
                left -= len(b)
        digest = "sha256:" + h.hexdigest()
        self.push_blob(path, digest, size)
        path.unlink()
        return {"digest": digest, "size": size}

    def push_blob(self, path: Path | None, digest: str, size: int, data: bytes | None = None) -> None:
        conn = http.client.HTTPConnection(IP["registry"], REGISTRY_PORT, timeout=600, blocksize=MiB)
        try:
            conn.request("POST", f"/v2/{REPO}/blobs/uploads/")
            r = conn.getresponse()
            r.read()
            if r.status != 202:
                raise RuntimeError(f"upload start: {r.status}")
            loc = urllib.parse.urlsplit(r.getheader("Location"))
            query = (loc.query + "&" if loc.query else "") + "digest=" + urllib.parse.quote(digest)
            hdrs = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            if data is not None:
                conn.request("PUT", f"{loc.path}?{query}", body=data, headers=hdrs)
            else:
                with open(path, "rb") as f:
                    conn.request("PUT", f"{loc.path}?{query}", body=f, headers=hdrs)
            r = conn.getresponse()
            body = r.read()
            if r.status != 201:
                raise RuntimeError(f"blob PUT: {r.status} {body[:300]!r}")
        finally:
            conn.close()

    def push_content(self) -> None:
        a = self.args
        t = time.monotonic()
        if "blob" in a.tests or "manifest" in a.tests:
            self.blobs["layer"] = self.make_blob(a.blob_size, "layer")
        if "rss" in a.tests:
            self.blobs["big"] = self.make_blob(a.rss_size, "big")
        layers = [self.blobs[k] for k in ("layer", "big") if k in self.blobs]
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}},
                            separators=(",", ":")).encode()
        cdig = "sha256:" + hashlib.sha256(config).hexdigest()
        self.push_blob(None, cdig, len(config), data=config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": cdig, "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": l["digest"], "size": l["size"]} for l in layers],
        }, separators=(",", ":")).encode()
        conn = http.client.HTTPConnection(IP["registry"], REGISTRY_PORT, timeout=30)
        try:
            conn.request("PUT", f"/v2/{REPO}/manifests/{TAG}", body=manifest, headers={"Content-Type": MANIFEST_TYPE})
            r = conn.getresponse()
            body = r.read()
            if r.status != 201:
                raise RuntimeError(f"manifest PUT: {r.status} {body[:300]!r}")
        finally:
            conn.close()
        self.manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.manifest_size = len(manifest)
        log(f"pushed {REPO}:{TAG} in {time.monotonic() - t:.1f} s: "
            + ", ".join(f"{k} {fmt_size(v['size'])} {v['digest'][:19]}" for k, v in self.blobs.items()))

    def stats(self, ip: str) -> dict:
        code, body, _ = self.http(f"http://{ip}:{PROXY_PORT}/_bay/stats")
        if code != 200:
            raise RuntimeError(f"stats of {ip}: {code}")
        return json.loads(body)

    def wait_held(self, ip: str, n: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats(ip)
            if s.get("blobs_held", 0) >= n:
                return s
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy {ip} holds fewer than {n} blobs after {timeout:.0f} s: {s}")
            time.sleep(0.1)

    # -- clients ---------------------------------------------------------------------------

    def wrk(self, name: str, url: str, script: Path, threads: int, conns: int, duration: float,
            headers=(), script_args=(), done_when=None) -> dict:
        """Runs wrk; `done_when()` true ends it early with SIGINT (wrk otherwise sleeps for the
        whole duration even when its threads have stopped)."""
        argv = ["wrk", "-t", threads, "-c", conns, "-d", f"{duration:g}s", "--timeout", "10s", "-s", script]
        for h in headers:
            argv += ["-H", h]
        argv += [url, "--", *script_args]
        out_path = self.logs / f"{name}.out"
        with open(out_path, "wb") as out:
            p = self.spawn(name, argv, server=False, stdout=out)
            deadline = time.monotonic() + duration + 60
            interrupted = False
            while p.poll() is None:
                if time.monotonic() > deadline:
                    self.stop(p)
                    raise RuntimeError(f"{name}: wrk did not finish")
                if done_when is not None and not interrupted and done_when():
                    p.send_signal(signal.SIGINT)
                    interrupted = True
                time.sleep(0.05)
            self.procs.pop(p.pid, None)
        text = out_path.read_text(errors="replace")
        m = re.search(r"^MICRO_JSON (\{.*\})$", text, re.M)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"{name}: wrk failed ({p.returncode}): {text[-1500:]} {self.tail(name)}")
        r = json.loads(m.group(1))
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
        # A read error is wrk finding a connection closed under it (opentracker closes after
        # every answer); the others are real failures.
        r["hard_errors"] = r["connect"] + r["write"] + r["status"] + r["timeout"]
        return r

    def curl_gets(self, name: str, url: str, streams: int, gets: int, size: int, timeout: float,
                  byte_range: str | None = None) -> dict:
        """`streams` concurrent curl processes, each GETting `url` `gets` times on one
        connection to /dev/null. Total bytes over wall time from first start to last end.
        With `byte_range` ("a-b") every GET asks for that range and expects 206 and b-a+1 bytes."""
        want_code = "200"
        if byte_range:
            lo, hi = map(int, byte_range.split("-"))
            size, want_code = hi - lo + 1, "206"
        fmt = "%{http_code} %{size_download} %{time_total}\\n"
        outs, procs = [], []
        t0 = time.monotonic()
        for i in range(streams):
            argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(timeout)), "-w", fmt]
            for _ in range(gets):
                argv += (["-r", byte_range] if byte_range else []) + ["-o", "/dev/null", url]
            out = open(self.logs / f"{name}-{i}.out", "wb+")
            outs.append(out)
            procs.append(self.spawn(f"{name}-{i}", argv, server=False, stdout=out))
        try:
            for p in procs:
                p.wait(timeout + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name}: curl did not finish within {timeout:.0f} s")
        wall = time.monotonic() - t0
        total, bad = 0, []
        for p, out in zip(procs, outs):
            self.procs.pop(p.pid, None)
            out.seek(0)
            lines = out.read().decode(errors="replace").split()
            out.close()
            for i in range(0, len(lines) - 2, 3):
                code, got = lines[i], int(lines[i + 1])
                total += got
                if code != want_code or got != size:
                    bad.append(f"{code} {got}")
            if p.returncode != 0:
                bad.append(f"curl exit {p.returncode}")
        if bad or total != streams * gets * size:
            raise RuntimeError(f"{name}: bad transfers: {bad[:5]}, {total} of {streams * gets * size} bytes "
                               f"{self.tail(f'{name}-0')}")
        return {"bytes": total, "wall_s": wall, "mib_s": total / MiB / wall}

    # -- 1. announce -----------------------------------------------------------------------

    def write_announce_files(self) -> None:
        a = self.args
        hashes = [hashlib.sha1(f"bay-micro-{i}".encode()).hexdigest() for i in range(a.hashes)]
        self.hashes_file = self.work / "hashes.txt"
        self.hashes_file.write_text("".join(h + "\n" for h in hashes))
        self.ot_dir = self.work / "opentracker"
        self.ot_dir.mkdir()
        os.chmod(self.ot_dir, 0o755)
        # The Debian build is whitelist-only (README.Debian): every info hash we announce is listed.
        (self.ot_dir / "whitelist").write_text("".join(h + "\n" for h in hashes))
        os.chmod(self.ot_dir / "whitelist", 0o644)
        self.lua_random = self.work / "announce-random.lua"
        self.lua_random.write_text(LUA_COMMON + LUA_ANNOUNCE + LUA_RANDOM)
        self.lua_fill = self.work / "announce-fill.lua"
        self.lua_fill.write_text(LUA_COMMON + LUA_ANNOUNCE + LUA_FILL)
        self.lua_plain = self.work / "plain.lua"
        self.lua_plain.write_text(LUA_COMMON + "failures, answers = 0, 0\n")

    def start_opentracker(self) -> subprocess.Popen:
        ip = IP["opentracker"]
        ensure_free(ip, OPENTRACKER_PORT, "opentracker")
        # -d: chroot dir (the whitelist path is read relative to it), -u: drops root.
        p = self.spawn("opentracker", ["opentracker", "-i", ip, "-p", OPENTRACKER_PORT, "-d", self.ot_dir,
                                       "-u", "nobody", "-w", "whitelist"], cwd=self.ot_dir)
        url = f"http://{ip}:{OPENTRACKER_PORT}"
        # No health endpoint: wait until an announce of a listed hash is answered with peers
        # (the whitelist is loaded by a background thread just after start).
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.check_announce(url) is None and p.poll() is None:
                    return p
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"opentracker not answering announces: {self.tail('opentracker')}")
            time.sleep(0.2)

    def check_announce(self, base: str) -> str | None:
        """None if a sample announce is answered with a bencoded peer list, else why not."""
        h = bytes.fromhex(self.hashes_file.read_text().split()[0])
        q = (f"info_hash={urllib.parse.quote(h)}&peer_id=-BM0001-999999999999&port=9999&uploaded=0"
             f"&downloaded=1&left=1&compact=1&numwant=50")
        code, body, _ = self.http(f"{base}/announce?{q}")
        if code != 200 or b"failure reason" in body or b"5:peers" not in body:
            return f"{code} {body[:200]!r}"
        return None

    def announce_one(self, name: str, ip: str, port: int, pid: int, close: bool) -> dict:
        """Fill pass, then the measured wrk run. `close`: every request carries `Connection:
        close`, so each announce is its own TCP connection (opentracker closes after every
        answer whatever the client asks; wrk then counts a harmless read error per request)."""
        a = self.args
        base = f"http://{ip}:{port}"
        why = self.check_announce(base)
        if why:
            raise RuntimeError(f"{name} refuses the sample announce: {why}")
        headers = ["Connection: close"] if close else []
        t = time.monotonic()
        self.fills = getattr(self, "fills", 0) + 1
        marker = self.work / f"{name}-fill{self.fills}-done-"
        fill = self.wrk(f"{name}-fill", f"{base}/announce", self.lua_fill, 1, min(a.wrk_conns, 16),
                        max(60.0, a.hashes * a.peers / 1000), headers=headers,
                        script_args=[self.hashes_file, a.peers, 1, marker],
                        done_when=lambda: Path(f"{marker}0").exists())
        if fill["failures"] or fill["answers"] < a.hashes * a.peers or fill["hard_errors"]:
            raise RuntimeError(f"{name}: fill pass: {fill['failures']} bad answers, {fill['hard_errors']} errors, "
                               f"{fill['answers']} of {a.hashes * a.peers}")
        log(f"  {name}: filled {a.hashes}x{a.peers} peers in {time.monotonic() - t:.1f} s, answers ok")
        def measure():
            cpu0 = proc_cpu_seconds(pid)
            w = Window()
            r = self.wrk(f"{name}-wrk", f"{base}/announce", self.lua_random, a.wrk_threads, a.wrk_conns,
                         a.wrk_duration, headers=headers, script_args=[self.hashes_file, a.peers, a.wrk_threads])
            cpu = proc_cpu_seconds(pid) - cpu0
            win = w.close(cpu)
            if r["hard_errors"]:
                raise RuntimeError(f"{name}: {r['hard_errors']} wrk errors: {r}")
            out = {"rps": round(r["rps"], 1), "requests": r["requests"], "errors": r["hard_errors"],
                   "read_errors": r["read"], "connection_close": close,
                   "bytes_per_response": round(r["bytes"] / max(1, r["requests"]), 1),
                   "lat_p50_ms": round(r["lat_p50_us"] / 1000, 3), "lat_p99_ms": round(r["lat_p99_us"] / 1000, 3),
                   "server_cpu_s": round(cpu, 3), "server_cpu_pct": round(100 * cpu / (r["duration_us"] / 1e6), 1),
                   "requests_per_cpu_s": round(r["requests"] / cpu, 1) if cpu else None,
                   "rss_mib": round(proc_status(pid).get("VmRSS", 0) / MiB, 1), "machine": win}
            log(f"  {name}: {out['rps']:.0f} req/s, {out['bytes_per_response']:.0f} B/answer, "
                f"server {out['server_cpu_pct']:.0f} % CPU, {out['requests_per_cpu_s'] or 0:.0f} req per CPU-s")
            return out
        return self.measured(f"announce {name}", measure)

    def test_announce(self, run_no: int) -> dict:
        res = {}
        # (result key, which server, Connection: close)
        cases = [("opentracker", "opentracker", True), ("bay", "bay", True)]
        if not self.args.no_keepalive:
            cases.append(("bay_keepalive", "bay", False))
        if run_no % 2:
            cases.reverse()
        for key, which, close in cases:
            if which == "opentracker":
                p = self.start_opentracker()
                try:
                    res[key] = self.announce_one("opentracker", IP["opentracker"], OPENTRACKER_PORT, p.pid, close)
                finally:
                    self.stop(p)
            else:
                label = "bay-tracker" + ("" if close else "-keepalive")
                p, data = self.start_tracker(IP["announce_tracker"], "bay-tracker-announce")
                try:
                    res[key] = self.announce_one(label, IP["announce_tracker"], TRACKER_PORT, p.pid, close)
                finally:
                    self.stop_and_remove(p, data)
        res["ratio"] = res["bay"]["rps"] / res["opentracker"]["rps"]
        res["ratio_per_cpu"] = (res["bay"]["requests_per_cpu_s"] / res["opentracker"]["requests_per_cpu_s"]
                                if res["bay"]["requests_per_cpu_s"] and res["opentracker"]["requests_per_cpu_s"] else None)
        if "bay_keepalive" in res:
            res["ratio_keepalive"] = res["bay_keepalive"]["rps"] / res["opentracker"]["rps"]
        log(f"  announce bay/opentracker = {res['ratio']:.3f} (per server CPU-s {res['ratio_per_cpu'] or 0:.3f})")
        return res

    # -- 2. cache-hit serving and 3. manifest latency ---------------------------------------

    def test_blob_and_manifest(self, run_no: int, tracker_ip: str) -> dict:
        a = self.args
        out = {}
        proxy, pdata = self.start_proxy(IP["proxy"], "bay-proxy", tracker_ip)
        try:
            purl = f"http://{IP['proxy']}:{PROXY_PORT}"
            if "blob" in a.tests:
                layer = self.blobs["layer"]
                path = f"/v2/{REPO}/blobs/{layer['digest']}"
                t = time.monotonic()
                first = self.curl_gets("fill-cache", purl + path, 1, 1, layer["size"], a.get_timeout)
                s = self.wait_held(IP["proxy"], 1, 120)
                log(f"  blob: first GET through the proxy {first['wall_s']:.1f} s "
                    f"(swarm downloads {s['swarm_downloads']}, fallbacks {s['fallbacks']}), cached")
                out["blob"] = self.blob_throughput(run_no, purl + path, self.registry_url + path, proxy.pid, layer)
                s2 = self.stats(IP["proxy"])
                out["blob"]["proxy_stats"] = s2
                if s2["cache_hits"] < a.streams * a.gets:
                    raise RuntimeError(f"proxy served only {s2['cache_hits']} cache hits: {s2}")
            if "manifest" in a.tests:
                out["manifest"] = self.manifest_latency(run_no, purl, proxy.pid)
        finally:
            self.stop_and_remove(proxy, pdata)
        return out

    def blob_throughput(self, run_no: int, proxy_url: str, reg_url: str, proxy_pid: int, layer: dict) -> dict:
        a = self.args
        res = {}
        # One untimed GET each: page cache warm for both files, the proxy's upstream
        # authorization answer cached (60 s, as for any client pulling twice).
        for url in (proxy_url, reg_url):
            self.curl_gets("warm", url, 1, 1, layer["size"], a.get_timeout)
        order = [("registry", reg_url, self.registry.pid), ("bay", proxy_url, proxy_pid)]
        if run_no % 2:
            order.reverse()
        if a.range_probe:
            # The same transfer as a Range GET of all but the last byte: the proxy serves ranges
            # straight from the file without re-hashing it, so the pair shows what the hash costs.
            rng = f"0-{layer['size'] - 2}"
            order += [(f"{w}_range", u, pid_) for w, u, pid_ in order]
        else:
            rng = None
        for which, url, pid in order:
            def measure():
                cpu0 = proc_cpu_seconds(pid)
                reg0 = proc_cpu_seconds(self.registry.pid)
                w = Window()
                r = self.curl_gets(f"gets-{which}", url, a.streams, a.gets, layer["size"], a.get_timeout,
                                   rng if which.endswith("_range") else None)
                cpu = proc_cpu_seconds(pid) - cpu0
                reg_cpu = proc_cpu_seconds(self.registry.pid) - reg0
                r["machine"] = w.close(cpu + (reg_cpu if which.startswith("bay") else 0))
                r["server_cpu_s"] = round(cpu, 3)
                if which.startswith("bay"):
                    r["registry_cpu_s"] = round(reg_cpu, 3)
                r["mib_per_cpu_s"] = round(r["bytes"] / MiB / cpu, 1) if cpu else None
                r["mib_s"] = round(r["mib_s"], 1)
                r["wall_s"] = round(r["wall_s"], 3)
                log(f"  blob {which}: {r['mib_s']:.0f} MiB/s ({a.streams} streams x {a.gets} GETs of "
                    f"{fmt_size(layer['size'])}{', Range ' + rng if which.endswith('_range') else ''}), server {cpu:.2f} CPU-s = {r['mib_per_cpu_s'] or 0:.0f} MiB per CPU-s")
                return r
            res[which] = self.measured(f"blob {which}", measure)
        if "bay_range" in res:
            res["ratio_range"] = res["bay_range"]["mib_s"] / res["registry_range"]["mib_s"]
            res["ratio_full_vs_range"] = res["bay"]["mib_s"] / res["bay_range"]["mib_s"]
        res["ratio"] = res["bay"]["mib_s"] / res["registry"]["mib_s"]
        res["ratio_per_cpu"] = (res["bay"]["mib_per_cpu_s"] / res["registry"]["mib_per_cpu_s"]
                                if res["bay"]["mib_per_cpu_s"] and res["registry"]["mib_per_cpu_s"] else None)
        log(f"  cache-hit serving bay/registry = {res['ratio']:.3f} (per server CPU-s {res['ratio_per_cpu'] or 0:.3f})")
        return res

    def manifest_latency(self, run_no: int, purl: str, proxy_pid: int) -> dict:
        a = self.args
        res = {}
        path = f"/v2/{REPO}/manifests/{TAG}"
        accept = f"Accept: {MANIFEST_TYPE}"
        for base in (purl, self.registry_url):
            code, body, hdrs = self.http(base + path, headers={"Accept": MANIFEST_TYPE})
            if code != 200 or hdrs.get("docker-content-digest") != self.manifest_digest:
                raise RuntimeError(f"manifest from {base}: {code} {hdrs.get('docker-content-digest')}")
        order = [("direct", self.registry_url), ("bay", purl)]
        if run_no % 2:
            order.reverse()
        for which, base in order:
            def measure():
                # Untimed warm-up (connections, upstream connection pool).
                self.wrk(f"manifest-warm-{which}", base + path, self.lua_plain, 1, a.latency_conns, 2,
                         headers=[accept])
                w = Window()
                cpu0 = proc_cpu_seconds(proxy_pid) + proc_cpu_seconds(self.registry.pid)
                r = self.wrk(f"manifest-{which}", base + path, self.lua_plain, 1, a.latency_conns,
                             a.latency_duration, headers=[accept])
                cpu = proc_cpu_seconds(proxy_pid) + proc_cpu_seconds(self.registry.pid) - cpu0
                if r["hard_errors"] or r["read"]:
                    raise RuntimeError(f"manifest {which}: wrk errors: {r}")
                out = {"p50_ms": round(r["lat_p50_us"] / 1000, 4), "p90_ms": round(r["lat_p90_us"] / 1000, 4),
                       "p99_ms": round(r["lat_p99_us"] / 1000, 4), "mean_ms": round(r["lat_mean_us"] / 1000, 4),
                       "max_ms": round(r["lat_max_us"] / 1000, 3), "rps": round(r["rps"], 1),
                       "requests": r["requests"], "bytes_per_response": round(r["bytes"] / max(1, r["requests"]), 1),
                       "servers_cpu_us_per_request": round(1e6 * cpu / max(1, r["requests"]), 1),
                       "machine": w.close(cpu)}
                log(f"  manifest {which}: p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms, "
                    f"{out['rps']:.0f} req/s")
                return out
            res[which] = self.measured(f"manifest {which}", measure)
        for q in ("p50", "p99"):
            res[f"added_{q}_ms"] = res["bay"][f"{q}_ms"] - res["direct"][f"{q}_ms"]
            res[f"ratio_{q}"] = res["bay"][f"{q}_ms"] / res["direct"][f"{q}_ms"]
        log(f"  manifest added latency p50 {res['added_p50_ms']:.3f} ms (x{res['ratio_p50']:.2f}), "
            f"p99 {res['added_p99_ms']:.3f} ms (x{res['ratio_p99']:.2f})")
        return res

    # -- 4. peak RSS -----------------------------------------------------------------------

    def test_rss(self, run_no: int, tracker_ip: str, tracker_pid: int) -> dict:
        a = self.args
        big = self.blobs["big"]
        res = {"quiet": self.wait_quiet("rss")}  # not repeated: it needs a fresh proxy
        proxy, pdata = self.start_proxy(IP["rss_proxy"], "bay-proxy-rss", tracker_ip)
        try:
            purl = f"http://{IP['rss_proxy']}:{PROXY_PORT}"
            url = f"{purl}/v2/{REPO}/blobs/{big['digest']}"
            pid = proxy.pid
            res["idle_hwm_mib"] = round(proc_status(pid).get("VmHWM", 0) / MiB, 1)
            res["tracker_hwm_before_mib"] = round(proc_status(tracker_pid).get("VmHWM", 0) / MiB, 1)
            for phase in ("swarm", "cache"):
                peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
                stop = threading.Event()

                def sample():
                    while not stop.is_set():
                        st = proc_status(pid)
                        for k in peaks:
                            peaks[k] = max(peaks[k], st.get(k, 0))
                        stop.wait(0.05)
                th = threading.Thread(target=sample, daemon=True)
                th.start()
                w = Window()
                cpu0 = proc_cpu_seconds(pid)
                others0 = proc_cpu_seconds(tracker_pid) + proc_cpu_seconds(self.registry.pid)
                try:
                    r = self.curl_gets(f"rss-{phase}", url, 1, 1, big["size"], a.get_timeout)
                finally:
                    stop.set()
                    th.join()
                cpu = proc_cpu_seconds(pid) - cpu0
                cpu_others = proc_cpu_seconds(tracker_pid) + proc_cpu_seconds(self.registry.pid) - others0
                st = proc_status(pid)
                stats = self.stats(IP["rss_proxy"])
                res[phase] = {"hwm_mib": round(st.get("VmHWM", 0) / MiB, 1),
                              "rss_after_mib": round(st.get("VmRSS", 0) / MiB, 1),
                              "sampled_peak_rss_mib": round(peaks["VmRSS"] / MiB, 1),
                              "sampled_peak_anon_mib": round(peaks["RssAnon"] / MiB, 1),
                              "sampled_peak_file_mib": round(peaks["RssFile"] / MiB, 1),
                              "get_s": round(r["wall_s"], 2), "mib_s": round(r["mib_s"], 1),
                              "proxy_cpu_s": round(cpu, 2), "tracker_registry_cpu_s": round(cpu_others, 2),
                              "stats": stats, "machine": w.close(cpu + cpu_others)}
                log(f"  rss {phase}: VmHWM {res[phase]['hwm_mib']:.1f} MiB (anon peak "
                    f"{res[phase]['sampled_peak_anon_mib']:.1f}, file {res[phase]['sampled_peak_file_mib']:.1f}), "
                    f"GET {r['wall_s']:.1f} s, {r['mib_s']:.0f} MiB/s")
                if phase == "swarm":
                    if stats["swarm_downloads"] < 1 or stats["fallbacks"]:
                        log(f"  warning: the first GET did not go only through the swarm: {stats}")
                    s = self.wait_held(IP["rss_proxy"], 1, 300)
                    res["swarm"]["stats"] = s
                    res["hwm_after_caching_mib"] = round(proc_status(pid).get("VmHWM", 0) / MiB, 1)
                    # Reset the high-water mark to the current RSS, so the second GET's peak is its own.
                    try:
                        Path(f"/proc/{pid}/clear_refs").write_text("5")
                        res["hwm_reset"] = True
                    except OSError as e:
                        res["hwm_reset"] = f"failed: {e}"
                    res["rss_before_cache_get_mib"] = round(proc_status(pid).get("VmRSS", 0) / MiB, 1)
                elif stats["cache_hits"] < 1:
                    raise RuntimeError(f"second GET was not a cache hit: {stats}")
            res["tracker_hwm_after_mib"] = round(proc_status(tracker_pid).get("VmHWM", 0) / MiB, 1)
        finally:
            self.stop_and_remove(proxy, pdata)
        return res

    # -- one run ---------------------------------------------------------------------------

    def run_once(self, run_no: int) -> dict:
        a = self.args
        log(f"run {run_no + 1}/{a.runs}")
        res = {"started": dt.datetime.now().isoformat(timespec="seconds")}
        if "announce" in a.tests:
            res["announce"] = self.test_announce(run_no)
        if any(t in a.tests for t in ("blob", "manifest", "rss")):
            tracker, tdata = self.start_tracker(IP["tracker"], "bay-tracker")
            try:
                if "blob" in a.tests or "manifest" in a.tests:
                    res.update(self.test_blob_and_manifest(run_no, IP["tracker"]))
                if "rss" in a.tests:
                    res["rss"] = self.test_rss(run_no, IP["tracker"], tracker.pid)
            finally:
                self.stop_and_remove(tracker, tdata)
        res["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        return res


# ---------------------------------------------------------------------------------------------
# Report

def machine_info(bin_dir: Path) -> dict:
    def out(cmd):
        try:
            return run(cmd, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    def pkg(name):
        return out(["dpkg-query", "-W", "-f", "${Version}", name]) or None
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), None)
    repo = Path(__file__).resolve().parent.parent
    dirty = [l.strip() for l in (out(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"]) or "")
             .splitlines() if l.strip()]
    bins = {}
    for b in ("bay-tracker", "bay-proxy"):
        p = bin_dir / b
        bins[b] = {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                   "mtime": dt.datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="seconds")}
    return {"nproc": os.cpu_count(), "cpu_model": model, "free_g": out(["free", "-g"]), "kernel": platform.release(),
            "wrk": pkg("wrk"), "opentracker": pkg("opentracker"), "docker_registry": pkg("docker-registry"),
            "curl": pkg("curl"), "bay_commit": out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
            "bay_tree_changes": dirty, "binaries": bins}


def summarize(res: dict) -> dict:
    runs = res["runs"]

    def col(*path):
        vals = []
        for r in runs:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(v)
        return vals
    rows = []

    def row(key, label, vals, fmt, target=None, ok=None):
        med = median(vals)
        verdict = None
        if ok is not None and med is not None:
            verdict = "met" if ok(med) else "NOT met"
        rows.append({"key": key, "label": label, "values": vals, "median": med, "fmt": fmt,
                     "target": target, "verdict": verdict})

    if all("announce" in r for r in runs):
        row("announce_bay_rps", "announce: bay-tracker req/s (connection per announce)", col("announce", "bay", "rps"), "{:.0f}")
        row("announce_ot_rps", "announce: opentracker req/s (connection per announce)", col("announce", "opentracker", "rps"), "{:.0f}")
        row("announce_ratio", "announce: **bay / opentracker**", col("announce", "ratio"), "{:.3f}", "≥ 1",
            lambda v: v >= 1)
        if all("bay_keepalive" in r["announce"] for r in runs):
            row("announce_bay_ka_rps", "announce: bay-tracker req/s, keep-alive (how bay-proxies announce)",
                col("announce", "bay_keepalive", "rps"), "{:.0f}")
            row("announce_ratio_ka", "announce: bay keep-alive / opentracker", col("announce", "ratio_keepalive"),
                "{:.3f}")
        row("announce_bay_per_cpu", "announce: bay-tracker req per server CPU-s",
            col("announce", "bay", "requests_per_cpu_s"), "{:.0f}")
        row("announce_ot_per_cpu", "announce: opentracker req per server CPU-s",
            col("announce", "opentracker", "requests_per_cpu_s"), "{:.0f}")
        row("announce_ratio_per_cpu", "announce: bay / opentracker per server CPU-s",
            col("announce", "ratio_per_cpu"), "{:.3f}")
    if all("blob" in r for r in runs):
        row("blob_bay", "cache-hit GET: bay-proxy MiB/s", col("blob", "bay", "mib_s"), "{:.0f}")
        row("blob_reg", "cache-hit GET: docker-registry MiB/s", col("blob", "registry", "mib_s"), "{:.0f}")
        row("blob_ratio", "cache-hit GET: **bay / registry**", col("blob", "ratio"), "{:.3f}", "≥ 1",
            lambda v: v >= 1)
        row("blob_bay_per_cpu", "cache-hit GET: bay-proxy MiB per server CPU-s", col("blob", "bay", "mib_per_cpu_s"),
            "{:.0f}")
        row("blob_reg_per_cpu", "cache-hit GET: registry MiB per server CPU-s",
            col("blob", "registry", "mib_per_cpu_s"), "{:.0f}")
        row("blob_ratio_per_cpu", "cache-hit GET: bay / registry per server CPU-s", col("blob", "ratio_per_cpu"),
            "{:.3f}")
        if all("bay_range" in r["blob"] for r in runs):
            row("blob_bay_range", "cache-hit Range GET (all but 1 byte; bay does not re-hash): bay-proxy MiB/s",
                col("blob", "bay_range", "mib_s"), "{:.0f}")
            row("blob_reg_range", "cache-hit Range GET: docker-registry MiB/s", col("blob", "registry_range", "mib_s"),
                "{:.0f}")
            row("blob_ratio_range", "cache-hit Range GET: bay / registry", col("blob", "ratio_range"), "{:.3f}")
    if all("manifest" in r for r in runs):
        for q in ("p50", "p99"):
            row(f"manifest_direct_{q}", f"manifest GET {q}: direct ms", col("manifest", "direct", f"{q}_ms"), "{:.3f}")
            row(f"manifest_bay_{q}", f"manifest GET {q}: through bay-proxy ms", col("manifest", "bay", f"{q}_ms"),
                "{:.3f}")
            row(f"manifest_added_{q}", f"manifest GET {q}: **added ms**", col("manifest", f"added_{q}_ms"), "{:.3f}")
            row(f"manifest_ratio_{q}", f"manifest GET {q}: proxy / direct", col("manifest", f"ratio_{q}"), "{:.2f}")
    if all("rss" in r for r in runs):
        row("rss_swarm", f"bay-proxy VmHWM, {fmt_size(res['params']['rss_size'])} GET via swarm, MiB",
            col("rss", "swarm", "hwm_mib"), "{:.1f}", "≤ 128", lambda v: v <= 128)
        row("rss_cache", "bay-proxy VmHWM, second GET from cache (peak reset), MiB", col("rss", "cache", "hwm_mib"),
            "{:.1f}", "≤ 128", lambda v: v <= 128)
        row("rss_idle", "bay-proxy VmHWM at start, MiB", col("rss", "idle_hwm_mib"), "{:.1f}")
        row("rss_swarm_get_s", f"swarm GET of {fmt_size(res['params']['rss_size'])} (tracker fetch + BitTorrent), s",
            col("rss", "swarm", "get_s"), "{:.1f}")
        row("rss_tracker", "bay-tracker VmHWM after both, MiB", col("rss", "tracker_hwm_after_mib"), "{:.1f}")
    return {"rows": rows}


def table(res: dict) -> str:
    n = len(res["runs"])
    head = "| measure | " + " | ".join(f"run {i + 1}" for i in range(n)) + " | **median** | target | verdict |"
    lines = [head, "|---" * (n + 4) + "|"]
    for r in res["summary"]["rows"]:
        f = lambda v: "–" if v is None else r["fmt"].format(v)
        lines.append(f"| {r['label']} | " + " | ".join(f(v) for v in r["values"]) +
                     f" | **{f(r['median'])}** | {r['target'] or ''} | {r['verdict'] or ''} |")
    shared = []
    for i, run_ in enumerate(res["runs"]):
        for test, v in run_.items():
            if not isinstance(v, dict):
                continue
            for sub in [v, *[x for x in v.values() if isinstance(x, dict)]]:
                m = sub.get("machine") if isinstance(sub, dict) else None
                if m and (m.get("builds_seen") or (m.get("others_cpu_pct") or 0) + (m.get("steal_pct") or 0) > 10):
                    shared.append(f"run {i + 1} {test}: other processes {m.get('others_cpu_pct')}–"
                                  f"{m.get('others_cpu_pct_upper')} % CPU, steal {m.get('steal_pct')} %"
                                  + (f", {'/'.join(m['builds_seen'])} running" if m.get("builds_seen") else ""))
    lines.append("")
    if shared:
        lines.append("Shared machine: " + "; ".join(sorted(set(shared))) + ".")
    else:
        lines.append("No compiler ran, and other processes plus the hypervisor's steal took ≤ 10 % of the CPU, "
                     "during every measurement.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/micro.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions of the whole set (default 3; median reported)")
    p.add_argument("--tests", default=",".join(TESTS), help=f"subset of {','.join(TESTS)} (default all)")
    p.add_argument("--bin-dir", help="where bay-tracker and bay-proxy are (default target/release)")
    p.add_argument("--out", help="results directory (default bench/results/micro-<date>)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads for announce (default 1)")
    p.add_argument("--wrk-conns", type=int, default=64, help="wrk connections for announce (default 64)")
    p.add_argument("--wrk-duration", type=float, default=10, help="seconds of each announce wrk run (default 10)")
    p.add_argument("--no-keepalive", action="store_true",
                   help="skip the extra announce run of bay-tracker with keep-alive connections")
    p.add_argument("--hashes", type=int, default=1000, help="distinct info hashes announced (default 1000)")
    p.add_argument("--peers", type=int, default=64, help="distinct peers per info hash (default 64)")
    p.add_argument("--blob-size", type=parse_size, default=parse_size("256M"), help="cache-hit blob (default 256M)")
    p.add_argument("--streams", type=int, default=4, help="concurrent GET clients for the blob test (default 4)")
    p.add_argument("--gets", type=int, default=4, help="GETs per client in the blob test (default 4)")
    p.add_argument("--no-range-probe", dest="range_probe", action="store_false",
                   help="skip the extra blob measurement with Range GETs (which the proxy serves without re-hashing)")
    p.add_argument("--latency-duration", type=float, default=10, help="seconds of each manifest wrk run (default 10)")
    p.add_argument("--latency-conns", type=int, default=1,
                   help="wrk connections for the manifest test (default 1: sequential requests)")
    p.add_argument("--rss-size", type=parse_size, default=parse_size("1G"), help="RSS-test blob (default 1G)")
    p.add_argument("--get-timeout", type=float, default=300, help="limit per curl client (default 300 s)")
    p.add_argument("--quiet-wait", type=float, default=180,
                   help="before each measurement wait up to this long for no compiler and < 25%% CPU (default 180 s)")
    p.add_argument("--retries", type=int, default=2,
                   help="repeat a measurement up to this many times while the machine was busy (default 2)")
    p.add_argument("--busy-limit", type=float, default=10,
                   help="other processes' CPU share (%%) above which a measurement counts as disturbed (default 10)")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers to CPU 0 and clients to CPU 1")
    p.add_argument("--timeout", type=float,
                   help="overall time limit in seconds (default: from the flags, at most 90 min + 5 min per run); "
                        "quiet waits and repeats stop when 15 min are left")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch dir (logs, data)")
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--print-timeout", action="store_true", help=argparse.SUPPRESS)
    return p


def derive_timeout(a) -> float:
    tries = 1 + a.retries
    per_run = 0.0
    if "announce" in a.tests:
        per_run += 3 * (max(60.0, a.hashes * a.peers / 1000) + 60 + tries * (a.quiet_wait + a.wrk_duration + 65))
    if "blob" in a.tests:
        per_run += 60 + 3 * a.get_timeout + (4 if a.range_probe else 2) * tries * (a.quiet_wait + a.get_timeout + 30)
    if "manifest" in a.tests:
        per_run += 2 * tries * (a.quiet_wait + a.latency_duration + 130)
    if "rss" in a.tests:
        per_run += a.quiet_wait + 60 + 2 * a.get_timeout + 300
    setup = 120 + (a.blob_size + a.rss_size) / (20 * MiB)
    # Worst cases add up to hours; quiet waits and repeats stop when 15 min are left.
    return min(setup + a.runs * per_run, 5400 + 300 * a.runs)


def main() -> int:
    args = build_parser().parse_args()
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    bad = [t for t in args.tests if t not in TESTS]
    if bad or not args.tests:
        sys.exit(f"unknown tests {bad}; choose from {','.join(TESTS)}")
    if args.runs < 1 or args.streams < 1 or args.gets < 1 or args.hashes < 1 or args.peers < 1:
        sys.exit("--runs, --streams, --gets, --hashes and --peers must be ≥ 1")
    if args.timeout is None:
        args.timeout = derive_timeout(args)
    if args.print_timeout:
        print(int(args.timeout))
        return 0
    if os.geteuid() != 0:
        sys.exit("needs root (opentracker drops to nobody, /proc/<pid>/clear_refs): run bench/micro.sh as root")
    repo = Path(__file__).resolve().parent.parent
    args.bin_dir = args.bin_dir or str(repo / "target" / "release")
    for b in ("bay-proxy", "bay-tracker"):
        if not os.access(Path(args.bin_dir) / b, os.X_OK):
            sys.exit(f"{Path(args.bin_dir) / b} missing: cargo build --release -p bay-tracker -p bay-proxy")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or repo / "bench" / "results" / f"micro-{stamp}")

    aborting = []

    def on_signal(signum, _frame):
        if aborting:
            return
        aborting.append(signum)
        raise Abort(f"signal {signal.Signals(signum).name}")

    def on_alarm(_signum, _frame):
        raise Abort(f"overall time limit of {args.timeout:.0f} s reached")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))

    bench = Bench(args)
    shown = [a if not re.search(r"\s", a) else repr(a) for a in sys.argv[1:]
             if not a.startswith("--work-dir")]
    wd = [i for i, a in enumerate(sys.argv) if a == "--work-dir"]
    if wd:
        shown = [a for i, a in enumerate(sys.argv[1:], 1) if i not in (wd[0], wd[0] + 1)]
    res: dict = {
        "command": " ".join(["bench/micro.sh", *shown]),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "params": {k: getattr(args, k) for k in ("runs", "tests", "wrk_threads", "wrk_conns", "wrk_duration", "hashes",
                                                  "peers", "blob_size", "streams", "gets", "latency_duration",
                                                  "latency_conns", "rss_size", "quiet_wait", "timeout")},
        "pinned": bench.pin,
        "addresses": IP,
        "machine": machine_info(Path(args.bin_dir)),
        "runs": [],
    }
    log(f"micro-benchmarks: tests {','.join(args.tests)}, {args.runs} runs, limit {args.timeout:.0f} s, "
        f"scratch {bench.work}, results {out}")
    status = 0
    try:
        bench.write_announce_files()
        if any(t in args.tests for t in ("blob", "manifest", "rss")):
            bench.start_registry()
            bench.push_content()
        for i in range(args.runs):
            try:
                res["runs"].append(bench.run_once(i))
            except (Abort, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - one bad run does not sink the others
                log(f"run {i + 1} failed: {type(e).__name__}: {e}")
                res.setdefault("failed_runs", []).append({"run": i + 1, "error": f"{type(e).__name__}: {e}"})
                for pid, (name, p) in list(bench.procs.items()):
                    if p is not bench.registry:
                        bench.stop(p)

    except Abort as e:
        log(f"aborted: {e}")
        res["aborted"] = str(e)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, tidy up, fail
        log(f"failed: {type(e).__name__}: {e}")
        res["error"] = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        signal.alarm(0)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        log("tidying up: processes, scratch directory")
        bench.cleanup()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
    res["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    if res["runs"]:
        res["summary"] = summarize(res)
        res["table_md"] = table(res)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
        print(res["table_md"])
        log(f"results: {out / 'results.json'}")
    else:
        log("no complete run: nothing written")
    return status


if __name__ == "__main__":
    sys.exit(main())
