#!/usr/bin/env python3
"""Swarm benchmark for bay: a bandwidth-shaped cluster in network namespaces on one machine.

Topology (all names carry the run id, all addresses live only inside our namespaces):

    <id>-br   a namespace holding bridge br0 and the bridge-side veth ends p-reg, p-trk, p-n<i>
    <id>-reg  docker-registry            10.251.0.2:5000   (eth0 <-> p-reg)
    <id>-trk  bay-tracker                10.251.0.3:6880, seed on :6881
    <id>-n<i> bay-proxy + skopeo client  10.251.0.<10+i>:5000, peers on :6881

Nothing is routed: every namespace has only its loopback and one veth in the bridged /24,
and the root namespace gets no interface at all. Each veth end is shaped with tbf to the
link bandwidth B: the namespace end shapes that host's upload, the bridge end its download.

Modes, run one after the other:
  direct  all N nodes `skopeo copy` the image straight from the registry at once
  cold    all N nodes pull through their own bay-proxy at once; the tracker holds nothing
  warm    the same with new, empty proxies while the tracker keeps what it fetched

Run it through bench/swarm.sh (root, dependency check, release build, hard time limit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

REGISTRY_PORT = 5000
TRACKER_PORT = 6880
PEER_PORT = 6881
LINK_CHECK_PORT = 5999
REPO = "bench/img"
TAG = "1"
MODES = ("direct", "cold", "warm", "aria2")
# The modes where every node pulls through its own bay-proxy.
BAY_MODES = ("cold", "warm")
ANCHOR_TRACKER_PORT = 6969
ANCHOR_SEED_PORT = 6882
# --chaos: `loss` (1 % of the packets to and from a third of the nodes dropped, for the whole run), `kill-proxy`
# (one proxy SIGKILLed mid-pull and started again on its data dir a second later), `kill-tracker`
# (the second tracker of the HA pair SIGKILLed mid-pull; started again before the next mode),
# `pause-registry` (docker-registry SIGSTOPped for 20 s early in the cold mode); not in the default set,
# `freeze-tracker` (the second tracker SIGSTOPped for 60 s at the moment kill-tracker would strike: a
# hung tracker, whose kernel still accepts connections; instead of kill-tracker, not with it).
FAULTS = ("loss", "kill-proxy", "kill-tracker", "pause-registry", "freeze-tracker")
DEFAULT_FAULTS = ("loss", "kill-proxy", "kill-tracker", "pause-registry")
REGISTRY_PAUSE_S = 20
TRACKER_FREEZE_S = 60
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CHUNK = 1 << 20
# --client parallel: manifest, then all blobs concurrently, each checked against its digest,
# stored like skopeo's dir: layout (one file per blob, named by its hex digest).
PARALLEL_CLIENT = r"""
import hashlib, json, os, sys, threading, urllib.request
base, repo, tag, out = sys.argv[1:5]
os.makedirs(out, exist_ok=True)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
manifest = json.load(opener.open(req, timeout=60))
errors = []
def get(blob):
    try:
        h, n = hashlib.sha256(), 0
        with opener.open(f"{base}/v2/{repo}/blobs/{blob['digest']}", timeout=120) as r, \
                open(os.path.join(out, blob["digest"][7:]), "wb") as f:
            while chunk := r.read(1 << 20):
                h.update(chunk); f.write(chunk); n += len(chunk)
        if "sha256:" + h.hexdigest() != blob["digest"] or n != blob["size"]:
            errors.append(f"{blob['digest']}: got {n} bytes, sha256:{h.hexdigest()}")
    except Exception as e:
        errors.append(f"{blob['digest']}: {e}")
threads = [threading.Thread(target=get, args=(b,)) for b in [manifest["config"], *manifest["layers"]]]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    sys.exit("\n".join(errors))
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


class Abort(Exception):
    """Ctrl-C, SIGTERM, or the overall time limit: unwind and tidy up."""


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Flag parsing

def parse_size(text: str) -> int:
    """Bytes from `256M`, `1G`, `128MiB`, `1.5G` or a plain number (binary suffixes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_rate(text: str) -> int:
    """Bits per second from `100mbit`, `1gbit`, `400Mbit/s`, `500kbit`; a bare number is Mbit/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)(bit|bps|b)?(/s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a bandwidth: {text!r}")
    prefix = m.group(2).lower()
    if not prefix and not m.group(3):
        prefix = "m"
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[prefix]
    bits = int(float(m.group(1)) * scale)
    if bits < 10**6:
        raise argparse.ArgumentTypeError("bandwidth below 1 Mbit/s is not useful here")
    return bits


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def duplicate_share(totals: dict) -> str:
    """Bytes the proxies fetched beyond the blobs' sizes (pieces received twice), in %."""
    size = totals.get("size", 0)
    if not size:
        return "–"
    return f"{100 * (totals['from_peers'] + totals['from_trackers'] - size) / size:.1f} %"


def fmt_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def fmt_rate(bits: float) -> str:
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/swarm.sh",
        description="Pull one image on N shaped nodes: directly, through a cold bay swarm and "
        "through a warm one. Needs root (network namespaces, tc).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-n", "--nodes", type=int, default=8, help="number of node namespaces (proxy + client)")
    p.add_argument("-s", "--size", type=parse_size, default=parse_size("256M"),
                   help="image payload S, split evenly over the layers (K/M/G binary suffixes)")
    p.add_argument("-l", "--layers", type=int, default=4, help="number of random tar layers")
    p.add_argument("-b", "--bandwidth", type=parse_rate, default=parse_rate("100mbit"),
                   help="per-link bandwidth B, both directions, every namespace incl. the registry "
                   "(e.g. 100mbit, 1gbit; a bare number is Mbit/s)")
    p.add_argument("--modes", default="direct,cold,warm",
                   help="comma-separated subset of direct,cold,warm,aria2, run in that order (aria2 only "
                   "with --blob)")
    p.add_argument("--blob", action="store_true",
                   help="single-blob mode: the image is one layer of --size, and every node GETs that blob "
                   "with curl (no manifest, so no prefetch); mode aria2 is the anchor: aria2c on every "
                   "node with opentracker and one aria2c seed, on the same links")
    p.add_argument("--client", choices=("skopeo", "parallel"), default="skopeo",
                   help="skopeo: `skopeo copy ... dir:` (fetches the blobs one after another); parallel: a "
                   "small Python client that GETs the manifest, then every blob at once (like docker pull), "
                   "checking each digest")
    p.add_argument("--proxy-port", type=int, default=5000, help="port of each node's bay-proxy registry API")
    p.add_argument("--subnet", default="10.251.0",
                   help="first three octets of the private /24 used only inside the namespaces")
    p.add_argument("--phase-timeout", type=float, default=0,
                   help="seconds one mode may take; 0 = 3 x N x S/B + 120")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds for the whole run; 0 = setup allowance + every phase timeout")
    p.add_argument("--tc-latency-ms", type=float, default=50, help="tbf latency (queue bound) per link")
    p.add_argument("--tc-burst", type=parse_size, default=0,
                   help="tbf burst per link; 0 = max(128 KiB, 4 ms at B) (veth sends 64 KiB GSO packets)")
    p.add_argument("--tcp-cc", default="",
                   help="TCP congestion control in every namespace (e.g. cubic, bbr; see "
                   "/proc/sys/net/ipv4/tcp_available_congestion_control); empty = what new namespaces get")
    p.add_argument("--tcp-cc-route", default="",
                   help="congestion control for the namespaces' subnet route only (`ip route ... congctl`), "
                   "leaving their default as it is: how a host that keeps BBR elsewhere runs bay on CUBIC")
    p.add_argument("--proxy-arg", action="append", default=[],
                   help="extra argument for every bay-proxy (repeatable, e.g. --proxy-arg=--stall-timeout=10)")
    p.add_argument("--tracker-arg", action="append", default=[], help="extra argument for bay-tracker (repeatable)")
    p.add_argument("--seed", type=int, default=1, help="seed of the image's pseudo-random layer bytes")
    p.add_argument("--trackers", type=int, choices=(1, 2), default=1,
                   help="bay-trackers: 2 is an HA pair (every proxy knows both), needed by --chaos")
    p.add_argument("--chaos", type=int, metavar="SEED", default=None,
                   help="inject faults while the swarm modes run, chosen and timed by this seed (see "
                   "--chaos-faults); implies --trackers 2 and skopeo retries")
    p.add_argument("--chaos-faults", default=",".join(DEFAULT_FAULTS),
                   help=f"which faults --chaos injects, a subset of {','.join(FAULTS)}")
    p.add_argument("--loss", type=float, default=1.0,
                   help="percent of packets the `loss` fault drops on each chosen node's links, both ways")
    p.add_argument("--bin-dir", default=None, help="directory with bay-proxy and bay-tracker (default: target/release)")
    p.add_argument("--out", default=None, help="results directory (default: bench/out/<time>-n<N>-s<S>-b<B>)")
    p.add_argument("--work-dir", default=None, help="scratch directory, removed at exit (default: a new temp dir)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (image, caches) at exit")
    p.add_argument("--run-id", default=None, help="prefix of the namespace names (default: bsw<pid>)")
    p.add_argument("--sample-interval", type=float, default=0.5, help="seconds between CPU / counter samples")
    p.add_argument("--quiet-cpu", type=float, default=25,
                   help="before each mode, wait until the machine's CPU is less busy than this percent "
                   "(other users' builds distort the numbers); 100 = don't wait")
    p.add_argument("--quiet-wait", type=float, default=600,
                   help="longest wait in seconds for a quiet CPU before a mode starts anyway (flagged)")
    p.add_argument("--no-link-check", action="store_true", help="skip the TCP throughput check of one shaped path")
    p.add_argument("--replot", metavar="RESULTS_JSON",
                   help="only redraw cdf.png and rewrite results.md from an earlier run's results.json")
    p.add_argument("--print-timeout", action="store_true", help="print the overall time limit in seconds and exit")
    return p


def derive_timeouts(args) -> None:
    tstar = args.size * 8 / args.bandwidth
    n_modes = len(args.modes)
    if not args.phase_timeout:
        args.phase_timeout = 3 * args.nodes * tstar + 120
    if not args.timeout:
        # Image generation (~30 MB/s worst case), push, link check, starting everything.
        setup = args.size / (30 << 20) + 180 + 2 * args.nodes
        quiet = args.quiet_wait if args.quiet_cpu < 100 else 0
        args.timeout = setup + n_modes * (args.phase_timeout + quiet + 60 + 2 * args.nodes)


# ---------------------------------------------------------------------------------------------
# The OCI image (the same layout as tests/fixtures/image.rs builds, re-done in Python)

class PseudoRandom:
    """A deterministic byte stream: AES-128-CTR of zeros keyed by the seed (openssl, fast),
    or Python's seeded `random.randbytes` when openssl is missing (slow but equivalent use)."""

    def __init__(self, seed: int, index: int):
        key = hashlib.sha256(f"bay-bench/{seed}/{index}".encode()).hexdigest()[:32]
        self.proc = None
        if shutil.which("openssl"):
            self.proc = subprocess.Popen(
                ["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key, "-iv", "0" * 32, "-in", "/dev/zero"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        else:
            import random
            self.rng = random.Random(key)

    def read(self, n: int) -> bytes:
        if self.proc is None:
            return self.rng.randbytes(n)
        out = bytearray()
        while len(out) < n:
            got = self.proc.stdout.read(n - len(out))
            if not got:
                raise RuntimeError("openssl stopped producing bytes")
            out += got
        return bytes(out)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def write_blob(blobs: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_layer(blobs: Path, index: int, size: int, seed: int) -> dict:
    """A one-file ustar archive `bay-layer-<i>.bin` of `size` pseudo-random bytes."""
    info = tarfile.TarInfo(f"bay-layer-{index}.bin")
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    tmp = blobs / f".layer-{index}.partial"
    h = hashlib.sha256()
    written = 0
    src = PseudoRandom(seed, index)
    try:
        with open(tmp, "wb") as f:
            def put(b: bytes) -> None:
                nonlocal written
                f.write(b)
                h.update(b)
                written += len(b)
            put(header)
            left = size
            while left:
                n = min(left, CHUNK)
                put(src.read(n))
                left -= n
            put(bytes((512 - size % 512) % 512 + 1024))
    finally:
        src.close()
    digest = "sha256:" + h.hexdigest()
    tmp.rename(blobs / digest[7:])
    return {"digest": digest, "size": written}


def descriptor(media_type: str, blob: dict) -> dict:
    return {"mediaType": media_type, "digest": blob["digest"], "size": blob["size"]}


def generate_image(layout: Path, total: int, n_layers: int, seed: int) -> dict:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    per = total // n_layers
    sizes = [per] * n_layers
    sizes[-1] += total - per * n_layers
    layers = [write_layer(blobs, i, s, seed) for i, s in enumerate(sizes)]
    created = "2024-01-01T00:00:00Z"
    config = {
        "created": created, "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
        "history": [{"created": created, "created_by": f"bay bench layer {i}: {l['size']} bytes, seed {seed}"}
                    for i, l in enumerate(layers)],
    }
    dumps = lambda v: json.dumps(v, separators=(",", ":")).encode()
    config_blob = write_blob(blobs, dumps(config))
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config_blob),
        "layers": [descriptor(LAYER_MEDIA_TYPE, l) for l in layers],
    }
    manifest_blob = write_blob(blobs, dumps(manifest))
    ref = descriptor(MANIFEST_MEDIA_TYPE, manifest_blob)
    ref["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_bytes(dumps({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [ref]}))
    return {"layers": layers, "config": config_blob, "manifest": manifest_blob}


# ---------------------------------------------------------------------------------------------
# Processes, namespaces, measurements

def run(argv, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_jiffies(with_irq: bool = False):
    """(busy, total[, irq + softirq]) jiffies of all CPUs since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    total = sum(v)
    if with_irq:
        return total - v[3] - v[4], total, v[5] + v[6]
    return total - v[3] - v[4], total


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def bencoded_name(torrent: bytes) -> str:
    """`info.name` of a single-file torrent: the file aria2c writes."""
    m = re.search(rb"4:name(\d+):", torrent)
    if not m:
        raise ValueError("torrent without info.name")
    n, at = int(m.group(1)), m.end()
    return torrent[at:at + n].decode()


class Bench:
    def __init__(self, args):
        self.args = args
        # The host's allowed congestion controls before allow_cc changed them, if it did.
        self.allowed_cc = None
        self.rid = args.run_id or f"bsw{os.getpid()}"
        self.ns_br = f"{self.rid}-br"
        self.ns_reg = f"{self.rid}-reg"
        self.ns_trk = f"{self.rid}-trk"
        self.ns_trk2 = f"{self.rid}-trk2"
        self.ns_nodes = [f"{self.rid}-n{i}" for i in range(args.nodes)]
        self.namespaces: list[str] = []
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}
        self.net = args.subnet
        self.reg_ip = f"{self.net}.2"
        self.trk_ip = f"{self.net}.3"
        self.trk2_ip = f"{self.net}.4"
        self.node_ips = [f"{self.net}.{10 + i}" for i in range(args.nodes)]
        self.registry_url = f"http://{self.reg_ip}:{REGISTRY_PORT}"
        self.tracker_url = f"http://{self.trk_ip}:{TRACKER_PORT}"
        self.tracker2_url = f"http://{self.trk2_ip}:{TRACKER_PORT}"
        self.registry = None
        self.tracker = None
        self.tracker2 = None
        self.chaos = args.chaos is not None
        self.faults = [f for f in args.chaos_faults.split(",") if f] if self.chaos else []
        self.lossy_nodes: list[int] = []
        self.proxies: list[subprocess.Popen] = []
        self.proxy_dirs: list[Path] = []
        self.anchor: list[subprocess.Popen] = []
        self.anchor_torrent: Path | None = None
        self.anchor_name = ""
        # A scratch dir we created, or an empty one we were handed (swarm.sh's mktemp), is ours to remove.
        given = Path(args.work_dir) if args.work_dir else None
        self.own_work = given is None or not given.exists() or not any(given.iterdir())
        self.work = given or Path(tempfile.mkdtemp(prefix="bay-swarm-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # A private copy: others may rebuild target/release while the proxies restart between modes.
        self.bin_dir = self.work / "bin"
        self.bin_dir.mkdir(exist_ok=True)
        self.binaries = {}
        for b in ("bay-proxy", "bay-tracker"):
            shutil.copy2(Path(args.bin_dir) / b, self.bin_dir / b)
            self.binaries[b] = "sha256:" + hashlib.sha256((self.bin_dir / b).read_bytes()).hexdigest()
        self.env = dict(os.environ, TMPDIR=str(self.work), NO_COLOR="1",
                        RUST_LOG=os.environ.get("BAY_BENCH_RUST_LOG", "info"))

    # -- processes -------------------------------------------------------------------------

    def spawn(self, name: str, ns: str, argv: list[str], log_name: str) -> subprocess.Popen:
        """Starts `argv` inside `ns` (`ip netns exec` execs it, so the PID is the program's)."""
        logf = open(self.logs / log_name, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        logf.close()
        self.procs[p.pid] = (name, p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        self.stop_all([p], grace)

    def stop_all(self, procs: list[subprocess.Popen], grace: float = 5.0) -> None:
        """SIGTERM to all of them at once, `grace` seconds for all to exit, then SIGKILL: a
        proxy still serving a pull takes its whole grace time, so one after the other would
        add up."""
        for p in procs:
            if p.returncode is None and p.poll() is None:
                try:
                    p.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    name = self.procs.get(p.pid, ("process",))[0]
                    log(f"{name} (pid {p.pid}) did not exit")
            self.procs.pop(p.pid, None)

    def ns_exec(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", ns, *argv], env=self.env, **kw)

    def http(self, ns: str, url: str, method: str = "GET", timeout: float = 10) -> tuple[int, str]:
        r = self.ns_exec(ns, ["curl", "-sS", "--noproxy", "*", "-X", method, "--max-time", str(timeout),
                              "-H", f"Accept: {MANIFEST_MEDIA_TYPE}", "-o", "/dev/null", "-w", "%{http_code}", url],
                         check=False, timeout=timeout + 5)
        code = r.stdout.strip()
        return (int(code) if code.isdigit() else 0), r.stderr

    def http_json(self, ns: str, url: str) -> dict:
        r = self.ns_exec(ns, ["curl", "-sSf", "--noproxy", "*", "--max-time", "10", url], timeout=15)
        return json.loads(r.stdout)

    def wait_http(self, ns: str, url: str, proc: subprocess.Popen, what: str, timeout: float = 60,
                  ok=(200,)) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready; see {self.logs}")
            code, _ = self.http(ns, url, timeout=2)
            if code in ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({url} -> {code})")
            time.sleep(0.1)

    # -- network ---------------------------------------------------------------------------

    def allow_cc(self) -> None:
        """Namespaces other than the root one may only pick an allowed congestion control: add
        --tcp-cc and --tcp-cc-route to the host's list for the run (cleanup puts the old list
        back)."""
        allowed = ALLOWED_CC.read_text().strip()
        add = [cc for cc in (self.args.tcp_cc, self.args.tcp_cc_route) if cc and cc not in allowed.split()]
        if add:
            self.allowed_cc = allowed
            ALLOWED_CC.write_text(" ".join([allowed, *dict.fromkeys(add)]))

    def add_ns(self, ns: str) -> None:
        if not self.namespaces:
            self.allow_cc()
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if self.args.tcp_cc:
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={self.args.tcp_cc}"])
        if len(self.namespaces) == 1:
            # Every namespace gets the same: what the first one has is the run's.
            self.tcp_cc = run(["ip", "netns", "exec", ns, "cat",
                               "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout.strip()

    def shape(self, ns: str, dev: str) -> None:
        a = self.args
        rate_bytes = a.bandwidth / 8
        burst = a.tc_burst or max(128 << 10, int(rate_bytes * 0.004))
        run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{a.bandwidth}bit",
             "burst", str(burst), "latency", f"{a.tc_latency_ms}ms"])
        self.tc_burst = burst

    def build_network(self) -> None:
        log(f"network: bridge namespace {self.ns_br}, {2 + self.args.nodes} hosts on {self.net}.0/24, "
            f"each link {fmt_rate(self.args.bandwidth)} both ways")
        self.add_ns(self.ns_br)
        run(["ip", "-n", self.ns_br, "link", "add", "br0", "type", "bridge", "stp_state", "0"])
        run(["ip", "-n", self.ns_br, "link", "set", "br0", "up"])
        hosts = [(self.ns_reg, "p-reg", self.reg_ip), (self.ns_trk, "p-trk", self.trk_ip)]
        if self.args.trackers == 2:
            hosts.append((self.ns_trk2, "p-trk2", self.trk2_ip))
        hosts += [(ns, f"p-n{i}", ip) for i, (ns, ip) in enumerate(zip(self.ns_nodes, self.node_ips))]
        for ns, port, ip in hosts:
            self.add_ns(ns)
            # Both ends are created directly inside our namespaces: the root namespace never
            # sees an interface of this benchmark.
            run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.ns_br])
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            if self.args.tcp_cc_route:
                run(["ip", "-n", ns, "route", "replace", f"{self.net}.0/24", "dev", "eth0", "proto", "kernel",
                     "scope", "link", "src", ip, "congctl", self.args.tcp_cc_route])
            run(["ip", "-n", self.ns_br, "link", "set", port, "master", "br0", "up"])
            self.shape(ns, "eth0")          # what this host sends
            self.shape(self.ns_br, port)    # what this host receives
        self.bridge_ports = [p for _, p, _ in hosts]

    def add_loss(self) -> None:
        """The `loss` fault: --loss percent of the packets a seeded third of the nodes send or
        receive are dropped where they arrive, after crossing their shaped links (this kernel has
        no netem; iptables' statistic match drops at random all the same)."""
        a = self.args
        k = max(1, a.nodes // 3)
        self.lossy_nodes = sorted(random.Random(f"{a.chaos}-loss").sample(range(a.nodes), k))
        hosts = [self.ns_reg, self.ns_trk] + ([self.ns_trk2] if a.trackers == 2 else []) + self.ns_nodes
        drop = ["-m", "statistic", "--mode", "random", "--probability", f"{a.loss / 100:.4f}", "-j", "DROP"]
        for i in self.lossy_nodes:
            run(["ip", "netns", "exec", self.ns_nodes[i], "iptables", "-A", "INPUT", *drop])
            for ns in hosts:
                if ns != self.ns_nodes[i]:
                    run(["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", self.node_ips[i], *drop])
        log(f"chaos: {a.loss} % packet loss both ways on nodes {', '.join(f'n{i}' for i in self.lossy_nodes)}")

    def loss_drops(self) -> int:
        """Packets the `loss` fault dropped so far, over every namespace."""
        hosts = [self.ns_reg, self.ns_trk] + ([self.ns_trk2] if self.args.trackers == 2 else []) + self.ns_nodes
        total = 0
        for ns in hosts:
            out = run(["ip", "netns", "exec", ns, "iptables", "-L", "INPUT", "-v", "-n", "-x"]).stdout
            total += sum(int(l.split()[0]) for l in out.splitlines() if "statistic" in l)
        return total

    def bridge_counters(self) -> dict[str, tuple[int, int]]:
        """Bridge-side (rx, tx) bytes of every port: rx of p-x is what host x sent, tx what it got."""
        data = json.loads(run(["ip", "-n", self.ns_br, "-s", "-j", "link", "show"]).stdout)
        return {d["ifname"]: (d["stats64"]["rx"]["bytes"], d["stats64"]["tx"]["bytes"])
                for d in data if d["ifname"].startswith("p-")}

    def registry_tx_bytes(self) -> int:
        """tx_bytes of the registry's own interface, read inside its namespace."""
        d = json.loads(run(["ip", "-n", self.ns_reg, "-s", "-j", "link", "show", "dev", "eth0"]).stdout)[0]
        return d["stats64"]["tx"]["bytes"]

    def tcp_counters(self, ns: str) -> tuple[int, int]:
        """(segments sent, segments retransmitted) by TCP in `ns`, from its /proc/net/snmp."""
        rows = [l.split() for l in self.ns_exec(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                if l.startswith("Tcp:")]
        tcp = dict(zip(rows[0][1:], (int(v) for v in rows[1][1:])))
        return tcp["OutSegs"], tcp["RetransSegs"]

    def qdisc_drops(self) -> dict[str, int]:
        """Packets each shaped link's tbf dropped so far: `<host>_up` (what it sends, its own
        eth0) and `<host>_down` (what it receives, its bridge port), host in tracker, n0, n1, ..."""
        def drops(ns: str, dev: str) -> int:
            d = json.loads(run(["tc", "-s", "-j", "-n", ns, "qdisc", "show", "dev", dev]).stdout)
            return sum(q.get("drops", 0) for q in d)
        hosts = [("tracker", self.ns_trk, "p-trk")]
        hosts += [(f"n{i}", ns, f"p-n{i}") for i, ns in enumerate(self.ns_nodes)]
        out = {}
        for name, ns, port in hosts:
            out[f"{name}_up"] = drops(ns, "eth0")
            out[f"{name}_down"] = drops(self.ns_br, port)
        return out

    def cc_in_use(self) -> dict[str, int]:
        """Established TCP connections per congestion control, in node 0 and the tracker (or the
        registry for a direct pull): what the run really used, whatever set it."""
        names = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
        seen: dict[str, int] = {}
        for ns in (self.ns_nodes[0], self.ns_trk if self.tracker else self.ns_reg):
            out = self.ns_exec(ns, ["ss", "-Htin", "state", "established"]).stdout
            for word in out.split():
                if word in names:
                    seen[word] = seen.get(word, 0) + 1
        return seen

    def tcp_snapshot(self) -> dict[str, tuple[int, int]]:
        hosts = {"tracker": self.ns_trk} if self.tracker else {}
        hosts.update({f"n{i}": ns for i, ns in enumerate(self.ns_nodes)})
        return {name: self.tcp_counters(ns) for name, ns in hosts.items()}

    def link_check(self) -> dict:
        """One TCP stream registry -> node 0 for ~3 s at B: confirms the shaping (goodput)."""
        n = int(self.args.bandwidth / 8 * 3)
        server = (
            "import socket,sys\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('{self.reg_ip}',{LINK_CHECK_PORT}));s.listen(1);c,_=s.accept()\n"
            f"buf=bytes(1<<20);n={n}\n"
            "while n>0:\n n-=c.send(buf[:min(n,len(buf))])\n"
            "c.shutdown(socket.SHUT_WR);c.recv(1);c.close()\n")
        client = (
            "import socket,time\n"
            "for _ in range(100):\n"
            f" try:\n  c=socket.create_connection(('{self.reg_ip}',{LINK_CHECK_PORT}));break\n"
            " except OSError: time.sleep(0.05)\n"
            "t=time.monotonic();got=0\n"
            "while True:\n b=c.recv(1<<20)\n if not b: break\n got+=len(b)\n"
            "print(got,time.monotonic()-t)\n")
        srv = self.spawn("link-check server", self.ns_reg, ["python3", "-c", server], "link-check.log")
        try:
            r = self.ns_exec(self.node_ns(0), ["python3", "-c", client], timeout=60)
            got, secs = r.stdout.split()
            got, secs = int(got), float(secs)
        finally:
            self.stop(srv, grace=2)
        goodput = got * 8 / secs
        log(f"link check registry -> n0: {fmt_bytes(got)} in {secs:.2f} s = {goodput / 1e6:.1f} Mbit/s "
            f"goodput ({100 * goodput / self.args.bandwidth:.1f} % of B)")
        return {"bytes": got, "seconds": secs, "goodput_bps": goodput, "fraction_of_B": goodput / self.args.bandwidth}

    def node_ns(self, i: int) -> str:
        return self.ns_nodes[i]

    # -- services --------------------------------------------------------------------------

    def start_registry(self) -> None:
        data = self.work / "registry"
        data.mkdir()
        config = self.work / "registry.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: \"{data}\"\n  delete:\n    enabled: true\n"
            "  cache:\n    blobdescriptor: inmemory\n"
            f"http:\n  addr: \"{self.reg_ip}:{REGISTRY_PORT}\"\n  secret: bay-bench\n")
        self.registry = self.spawn("docker-registry", self.ns_reg, ["docker-registry", "serve", str(config)],
                                   "registry.log")
        self.wait_http(self.ns_reg, f"{self.registry_url}/v2/", self.registry, "docker-registry", 30)
        log(f"docker-registry up at {self.registry_url} (pid {self.registry.pid})")

    def push_image(self) -> dict:
        a = self.args
        layout = self.work / "image"
        t = time.monotonic()
        image = generate_image(layout, a.size, a.layers, a.seed)
        log(f"image generated in {time.monotonic() - t:.1f} s: {a.layers} layers, "
            f"manifest {image['manifest']['digest'][:19]}")
        t = time.monotonic()
        # Pushed from inside the registry namespace to its own address: over loopback, unshaped.
        self.ns_exec(self.ns_reg, ["skopeo", "--insecure-policy", "copy", "--retry-times=0", "--preserve-digests",
                                   "--dest-tls-verify=false", "--dest-no-creds", f"oci:{layout}:latest",
                                   f"docker://{self.reg_ip}:{REGISTRY_PORT}/{REPO}:{TAG}"], timeout=600)
        r = self.ns_exec(self.ns_reg, ["curl", "-sSf", "-I", "-H", f"Accept: {MANIFEST_MEDIA_TYPE}",
                                       f"{self.registry_url}/v2/{REPO}/manifests/{TAG}"])
        served = re.search(r"(?im)^docker-content-digest:\s*(\S+)", r.stdout)
        if not served or served.group(1) != image["manifest"]["digest"]:
            raise RuntimeError(f"registry serves {served and served.group(1)}, pushed {image['manifest']['digest']}")
        log(f"pushed {REPO}:{TAG} in {time.monotonic() - t:.1f} s")
        shutil.rmtree(layout)
        return image

    def start_tracker(self) -> None:
        self.tracker = self.start_one_tracker(self.ns_trk, self.trk_ip, "tracker")
        if self.args.trackers == 2:
            self.tracker2 = self.start_one_tracker(self.ns_trk2, self.trk2_ip, "tracker2")

    def start_one_tracker(self, ns: str, ip: str, name: str) -> subprocess.Popen:
        """Starts (or starts again, on the same data dir) the tracker of namespace `ns`."""
        data = self.work / name
        data.mkdir(exist_ok=True)
        argv = [str(self.bin_dir / "bay-tracker"), "--listen", f"{ip}:{TRACKER_PORT}",
                "--peer-port", str(PEER_PORT), "--upstream", self.registry_url, "--data-dir", str(data),
                *self.args.tracker_arg]
        p = self.spawn(f"bay-{name}", ns, argv, f"{name}.log")
        self.wait_http(ns, f"http://{ip}:{TRACKER_PORT}/healthz", p, f"bay-{name}")
        log(f"bay-{name} up at http://{ip}:{TRACKER_PORT} (pid {p.pid})")
        return p

    def tracker_urls(self) -> list[str]:
        return [self.tracker_url] + ([self.tracker2_url] if self.args.trackers == 2 else [])

    def ensure_trackers(self) -> None:
        """Starts a tracker the last mode's chaos killed again, on its data dir."""
        if self.tracker2 is not None and self.tracker2.poll() is not None:
            self.procs.pop(self.tracker2.pid, None)
            self.tracker2 = self.start_one_tracker(self.ns_trk2, self.trk2_ip, "tracker2")

    def proxy_argv(self, i: int, data: Path) -> list[str]:
        trackers = [arg for url in self.tracker_urls() for arg in ("--tracker", url)]
        return [str(self.bin_dir / "bay-proxy"), "--listen", f"{self.node_ips[i]}:{self.args.proxy_port}",
                "--peer-port", str(PEER_PORT), *trackers,
                "--upstream", self.registry_url, "--default-upstream", self.registry_url,
                "--data-dir", str(data), *self.args.proxy_arg]

    def start_proxies(self, mode: str) -> None:
        self.proxies, self.proxy_dirs = [], []
        for i, ns in enumerate(self.ns_nodes):
            data = self.work / f"proxy-{mode}-n{i}"
            data.mkdir()
            self.proxies.append(self.spawn(f"bay-proxy n{i}", ns, self.proxy_argv(i, data),
                                           f"{mode}-proxy-n{i}.log"))
            self.proxy_dirs.append(data)
        for i, p in enumerate(self.proxies):
            self.wait_http(self.ns_nodes[i], f"http://{self.node_ips[i]}:{self.args.proxy_port}/_bay/healthz",
                           p, f"bay-proxy n{i}")
        log(f"{len(self.proxies)} bay-proxies up (empty data dirs)")

    def stop_proxies(self) -> None:
        self.stop_all(self.proxies)
        for d in self.proxy_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.proxies, self.proxy_dirs = [], []

    def prewarm_tracker(self, image: dict) -> None:
        """For `warm` without `cold`: have the trackers fetch and seed every blob first."""
        for blob in image["layers"] + [image["config"]]:
            for base in self.tracker_urls():
                url = f"{base}/v1/torrents/{self.reg_ip}:{REGISTRY_PORT}/{REPO}/blobs/{blob['digest']}"
                code, _ = self.http(self.ns_trk, url, timeout=self.args.phase_timeout)
                if code != 200:
                    raise RuntimeError(f"tracker could not fetch {blob['digest']}: HTTP {code}")
        log("the trackers hold every blob")

    # -- the aria2c anchor (--blob, mode aria2) ---------------------------------------------

    def aria2_argv(self, out: Path, port: int, torrent: Path, extra: list[str], log_name: str) -> list[str]:
        """aria2c on one host: peers only from opentracker (no DHT, LPD or PEX), the hook that
        marks the download done, and it keeps seeding until stopped."""
        out.mkdir(parents=True, exist_ok=True)
        return ["aria2c", "--no-conf=true", "--disable-ipv6=true", "--enable-dht=false", "--enable-dht6=false",
                "--bt-enable-lpd=false", "--enable-peer-exchange=false", "--allow-overwrite=true",
                "--auto-file-renaming=false", "--file-allocation=none", "--console-log-level=warn",
                "--summary-interval=0", "--show-console-readout=false", "--enable-color=false",
                f"--listen-port={port}", f"--dir={out}", f"--stop-with-process={os.getpid()}",
                f"--bt-tracker=http://{self.trk_ip}:{ANCHOR_TRACKER_PORT}/announce", "--bt-exclude-tracker=*",
                f"--on-bt-download-complete={self.work / 'aria2-done.sh'}",
                f"--log={self.logs / log_name}", "--log-level=info", *extra, str(torrent)]

    def start_anchor(self, image: dict) -> None:
        """opentracker and an aria2c seed on the tracker's host, with bay's torrent of the blob
        (the same pieces a bay swarm moves)."""
        blob = image["layers"][0]
        url = f"{self.tracker_url}/v1/torrents/{self.reg_ip}:{REGISTRY_PORT}/{REPO}/blobs/{blob['digest']}"
        torrent = self.work / "anchor.torrent"
        headers = self.ns_exec(self.ns_trk, ["curl", "-sSf", "--noproxy", "*", "-D", "-", "-o", str(torrent), url],
                               timeout=self.args.phase_timeout).stdout
        info_hash = re.search(r"(?im)^x-bay-info-hash:\s*([0-9a-f]{40})", headers).group(1)
        # Debian's opentracker serves only whitelisted torrents; it chroots into its dir first.
        ot_dir = self.work / "anchor-opentracker"
        ot_dir.mkdir(exist_ok=True)
        (ot_dir / "whitelist").write_text(info_hash + "\n")
        self.anchor_torrent = torrent
        self.anchor_name = bencoded_name(torrent.read_bytes())
        hook = self.work / "aria2-done.sh"
        hook.write_text('#!/bin/sh\ntouch "$(dirname "$3")/done"\n')
        hook.chmod(0o755)
        seed_dir = self.work / "anchor-seed"
        seed_dir.mkdir(exist_ok=True)
        self.ns_exec(self.ns_reg, ["curl", "-sSf", "--noproxy", "*", "-o", str(seed_dir / self.anchor_name),
                                   f"{self.registry_url}/v2/{REPO}/blobs/{blob['digest']}"], timeout=600)
        self.anchor = [
            self.spawn("opentracker", self.ns_trk, ["opentracker", "-i", self.trk_ip, "-p", str(ANCHOR_TRACKER_PORT),
                                                  "-P", str(ANCHOR_TRACKER_PORT), "-d", str(ot_dir),
                                                  "-w", "/whitelist"],
                       "anchor-opentracker.log"),
            self.spawn("aria2c seed", self.ns_trk,
                       self.aria2_argv(seed_dir, ANCHOR_SEED_PORT, torrent,
                                       ["--check-integrity=true", "--seed-ratio=0.0", "--bt-seed-unverified=false"],
                                       "anchor-seed.debug.log"),
                       "anchor-seed.log"),
        ]
        # The seed has checked its file (the hook marks it) and announced itself.
        deadline = time.monotonic() + 120
        while not (seed_dir / "done").exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.anchor):
                raise RuntimeError("the aria2c seed did not start seeding: see logs/anchor-seed.log")
            time.sleep(0.1)
        time.sleep(2)
        log(f"anchor: opentracker at {self.trk_ip}:{ANCHOR_TRACKER_PORT}, aria2c seeding {self.anchor_name}")

    def stop_anchor(self) -> None:
        self.stop_all(self.anchor)
        self.anchor = []
        shutil.rmtree(self.work / "anchor-seed", ignore_errors=True)

    # -- chaos -----------------------------------------------------------------------------

    def chaos_plan(self, mode: str, tstar: float) -> list[tuple[float, str, int]]:
        """The faults of one mode: (seconds after the start, fault, which), from the seed."""
        # Every draw is made whichever faults are on, so a fault strikes at the same moment
        # alone as with the others: runs with a subset of the faults compare with the full one.
        r = random.Random(f"{self.args.chaos}-{mode}")
        drawn = [(r.uniform(0.2, 0.4) * tstar, "kill-proxy", r.randrange(self.args.nodes)),
                 (r.uniform(0.3, 0.6) * tstar, "kill-tracker", 2),
                 (r.uniform(0.0, 0.2) * tstar, "pause-registry", 0)]
        drawn.append((drawn[1][0], "freeze-tracker", 2))
        return sorted(d for d in drawn if d[1] in self.faults
                      and (not d[1].endswith("-tracker") or self.tracker2 is not None)
                      and (d[1] != "pause-registry" or mode == "cold"))

    def chaos_run(self, mode: str, plan, start: float, stop: threading.Event, events: list) -> None:
        """Carries the plan out while the pulls run; records what happened when."""
        def note(what: str) -> None:
            events.append({"t": round(time.monotonic() - start, 2), "event": what})
            log(f"[{mode}] chaos at {time.monotonic() - start:.1f} s: {what}")

        threads = [threading.Thread(target=self.chaos_strike, args=(mode, f, start, stop, note),
                                    name=f"chaos-{f[1]}", daemon=True) for f in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def chaos_strike(self, mode: str, planned, start: float, stop: threading.Event, note) -> None:
        """One fault of the plan, at its moment (each in its own thread: a 20 s pause of the
        registry does not hold the others back)."""
        at, fault, which = planned
        if stop.wait(max(0.0, start + at - time.monotonic())):
            return
        if fault == "kill-proxy":
            p = self.proxies[which]
            try:
                p.kill()
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            self.procs.pop(p.pid, None)
            note(f"killed bay-proxy n{which}")
            time.sleep(1)
            self.proxies[which] = self.spawn(f"bay-proxy n{which}", self.ns_nodes[which],
                                             self.proxy_argv(which, self.proxy_dirs[which]),
                                             f"{mode}-proxy-n{which}.log")
            note(f"started bay-proxy n{which} again on its data dir")
        elif fault == "kill-tracker":
            try:
                self.tracker2.kill()
                self.tracker2.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            note("killed bay-tracker 2 of 2")
        elif fault == "freeze-tracker":
            self.chaos_pause(self.tracker2.pid, TRACKER_FREEZE_S, stop, note,
                             "froze bay-tracker 2 of 2", "thawed bay-tracker 2 of 2")
        elif fault == "pause-registry":
            self.chaos_pause(self.registry.pid, REGISTRY_PAUSE_S, stop, note,
                             "paused docker-registry", "resumed docker-registry")

    @staticmethod
    def chaos_pause(pid: int, seconds: float, stop: threading.Event, note, paused: str, resumed: str) -> None:
        """SIGSTOPs a process for `seconds` (less if the mode ends first), then SIGCONTs it."""
        os.kill(pid, signal.SIGSTOP)
        note(f"{paused} (SIGSTOP) for {seconds} s")
        stop.wait(seconds)
        os.kill(pid, signal.SIGCONT)
        note(f"{resumed} (SIGCONT)")

    def fallbacks_by_reason(self) -> dict[str, int]:
        """The proxies' bay_fallbacks_total by reason (a restarted proxy counts from its restart)."""
        out: dict[str, int] = {}
        for i in range(self.args.nodes):
            url = f"http://{self.node_ips[i]}:{self.args.proxy_port}/_bay/metrics"
            r = self.ns_exec(self.ns_nodes[i], ["curl", "-sS", "--noproxy", "*", "--max-time", "10", url],
                             check=False, timeout=15)
            for m in re.finditer(r'^bay_fallbacks_total\{reason="(\w+)"\} (\d+)', r.stdout, re.M):
                out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
        return out

    # -- one mode --------------------------------------------------------------------------

    def wait_quiet(self, mode: str) -> dict:
        """Waits until the CPU is quiet (this machine is shared with builds and tests)."""
        a = self.args
        started = time.monotonic()
        busy = None
        while True:
            b0, t0 = cpu_jiffies()
            time.sleep(2)
            b1, t1 = cpu_jiffies()
            busy = (b1 - b0) / max(1, t1 - t0)
            waited = time.monotonic() - started
            if 100 * busy < a.quiet_cpu:
                break
            if waited >= a.quiet_wait:
                log(f"[{mode}] CPU still {100 * busy:.0f} % busy after {waited:.0f} s: starting anyway (flagged)")
                break
            if waited < 3 or int(waited) % 30 < 2:
                log(f"[{mode}] waiting for a quiet CPU: {100 * busy:.0f} % busy (want < {a.quiet_cpu:.0f} %)")
        return {"busy_before": busy, "waited_s": time.monotonic() - started,
                "quiet": 100 * busy < a.quiet_cpu or a.quiet_cpu >= 100}

    def run_mode(self, mode: str, image: dict) -> dict:
        a = self.args
        blobs = image["layers"][:1] if a.blob else image["layers"] + [image["config"]]
        S = sum(b["size"] for b in blobs)
        tstar = S * 8 / a.bandwidth
        if mode == "direct":
            sources = [f"{self.reg_ip}:{REGISTRY_PORT}"] * a.nodes
        else:
            sources = [f"{ip}:{a.proxy_port}" for ip in self.node_ips]
        outs = [self.work / f"pull-{mode}-n{i}" for i in range(a.nodes)]
        quiet = self.wait_quiet(mode) if a.quiet_cpu < 100 else {"busy_before": None, "waited_s": 0, "quiet": True}
        access_lines_before = self.registry_log_lines()
        tracker_before = self.http_json(self.ns_trk, f"{self.tracker_url}/v1/stats") if self.tracker else {}
        reg_tx0 = self.registry_tx_bytes()
        ports0 = self.bridge_counters()
        tcp0 = self.tcp_snapshot()
        drops0 = self.qdisc_drops()
        lost0 = self.loss_drops() if self.lossy_nodes else 0
        svc_cpu0 = self.service_cpu()
        irq0 = cpu_jiffies(with_irq=True)
        window0 = time.monotonic()
        results: list[dict] = [{} for _ in range(a.nodes)]
        how = {"direct": "from the registry", "aria2": "with aria2c, opentracker and an aria2c seed"}
        log(f"[{mode}] {a.nodes} nodes pull {fmt_bytes(S)} at once "
            f"({how.get(mode, 'each through its own bay-proxy')}); "
            f"T* = S/B = {tstar:.1f} s, timeout {a.phase_timeout:.0f} s")
        sampler = self.start_sampler(mode)
        time.sleep(2 * a.sample_interval)
        start = time.monotonic()
        chaos_events: list[dict] = []
        chaos_stop = threading.Event()
        chaos_thread = None
        if self.chaos and mode in BAY_MODES:
            plan = self.chaos_plan(mode, tstar)
            chaos_thread = threading.Thread(target=self.chaos_run, args=(mode, plan, start, chaos_stop, chaos_events),
                                            name="chaos", daemon=True)
            chaos_thread.start()
        # Under chaos a client retries, as docker does, so a killed proxy costs a retry.
        retries = 5 if self.chaos else 0
        pulls = []
        for i in range(a.nodes):
            if mode == "aria2":
                argv = self.aria2_argv(outs[i], PEER_PORT, self.anchor_torrent, ["--seed-ratio=0.0"],
                                       f"aria2-n{i}.debug.log")
            elif a.blob:
                digest = blobs[0]["digest"]
                argv = ["sh", "-c", 'mkdir -p "$0" && exec curl -sS --fail --noproxy "*" -o "$0/$1" "$2"',
                        str(outs[i]), digest[7:], f"http://{sources[i]}/v2/{REPO}/blobs/{digest}"]
            elif a.client == "skopeo":
                argv = ["skopeo", "--insecure-policy", "copy", f"--retry-times={retries}", "--src-tls-verify=false",
                        "--src-no-creds", f"docker://{sources[i]}/{REPO}:{TAG}", f"dir:{outs[i]}"]
            else:
                argv = ["python3", "-c", PARALLEL_CLIENT, f"http://{sources[i]}", REPO, TAG, str(outs[i])]
            if self.chaos:
                # As a CI job does around `docker pull`: a pull that fails (its proxy was killed
                # under it) is run again from scratch, up to 5 times.
                argv = ["sh", "-c", 'for a in 1 2 3 4 5; do echo "bench: attempt $a"; rm -rf "$0"; '
                        '"$@" && exit 0; sleep 1; done; exit 1', str(outs[i]), *argv]
            pulls.append(self.spawn(f"client n{i}", self.ns_nodes[i], argv, f"{mode}-client-n{i}.log"))
            results[i]["launched_s"] = time.monotonic() - start

        def reap(i: int, p: subprocess.Popen) -> None:
            _, status, usage = os.wait4(p.pid, 0)
            results[i]["seconds"] = time.monotonic() - start
            p.returncode = os.waitstatus_to_exitcode(status)
            results[i]["exit"] = p.returncode
            results[i]["cpu_s"] = usage.ru_utime + usage.ru_stime
            self.procs.pop(p.pid, None)

        def seen_done(i: int) -> None:
            # aria2c keeps seeding after its download, as a proxy does: done is when its
            # --on-bt-download-complete hook left the marker.
            marker = outs[i] / "done"
            while not marker.exists() and time.monotonic() < start + a.phase_timeout:
                if pulls[i].poll() is not None:
                    return
                time.sleep(0.02)
            if marker.exists():
                results[i]["seconds"] = time.monotonic() - start
                results[i]["exit"] = 0

        target = seen_done if mode == "aria2" else reap
        reapers = [threading.Thread(target=target, args=(i,) if mode == "aria2" else (i, p), name=f"reap-n{i}",
                                    daemon=True) for i, p in enumerate(pulls)]
        for t in reapers:
            t.start()
        deadline = start + a.phase_timeout
        last_report = start
        cc_seen = None
        while any(t.is_alive() for t in reapers):
            now = time.monotonic()
            if now > deadline:
                log(f"[{mode}] phase timeout: killing the pulls still running")
                for p in pulls:
                    if p.returncode is None:
                        try:
                            p.kill()
                        except ProcessLookupError:
                            pass
                for t in reapers:
                    t.join(10)
                break
            if cc_seen is None and now - start >= tstar / 2:
                cc_seen = self.cc_in_use()
            if now - last_report >= 15:
                done = sum(1 for r in results if "seconds" in r)
                log(f"[{mode}] {now - start:.0f} s: {done}/{a.nodes} done")
                last_report = now
            time.sleep(0.05)
        wall = time.monotonic() - start
        if mode == "aria2":
            for i, p in enumerate(pulls):
                results[i]["cpu_s"] = proc_cpu_seconds(p.pid) if p.poll() is None else 0.0
            self.stop_all(pulls, grace=3)
            for r in results:
                r.setdefault("exit", 1)
        if chaos_thread is not None:
            chaos_stop.set()
            chaos_thread.join(30)
            # A registry still paused when the pulls ended is resumed.
            try:
                os.kill(self.registry.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        # CPU accounting window: from just before the sampler started to the last pull's end.
        irq1, svc_cpu1 = cpu_jiffies(with_irq=True), self.service_cpu()
        window = time.monotonic() - window0
        time.sleep(a.sample_interval)
        samples = self.stop_sampler(sampler, mode)
        reg_tx = self.registry_tx_bytes() - reg_tx0
        ports1 = self.bridge_counters()
        tcp1 = self.tcp_snapshot()
        drops1 = self.qdisc_drops()

        # Each copy must hold every blob with its digest: skopeo checks too, this does not trust it.
        for i, r in enumerate(results):
            r["node"] = i
            r["ok"] = r.get("exit") == 0 and all(
                self.holds(outs[i] / (self.anchor_name if mode == "aria2" else b["digest"][7:]), b) for b in blobs)
            if self.chaos:
                text = (self.logs / f"{mode}-client-n{i}.log").read_text(errors="replace")
                r["attempts"] = text.count("bench: attempt ")
            if not r["ok"]:
                tail = (self.logs / f"{mode}-client-n{i}.log").read_text(errors="replace")[-400:]
                r["error"] = tail.strip() or f"exit {r.get('exit')}"
                log(f"[{mode}] n{i} FAILED: {r['error'][-200:]}")
            shutil.rmtree(outs[i], ignore_errors=True)
        times = sorted(r["seconds"] for r in results if r["ok"])
        out = {
            "mode": mode, "nodes": results, "ok": len(times), "wall_s": wall,
            "p50_s": percentile(times, 0.5), "p90_s": percentile(times, 0.9), "max_s": times[-1] if times else None,
            "tstar_s": tstar,
            "upstream_iface_bytes": reg_tx,
            "upstream_blob_bytes": self.registry_blob_bytes(access_lines_before),
            "node_rx_bytes": sum(ports1[f"p-n{i}"][1] - ports0[f"p-n{i}"][1] for i in range(a.nodes)),
            "node_tx_bytes": sum(ports1[f"p-n{i}"][0] - ports0[f"p-n{i}"][0] for i in range(a.nodes)),
            "tracker_tx_bytes": sum(ports1[p][0] - ports0[p][0] for p in ("p-trk", "p-trk2") if p in ports1),
        }
        out["max_over_tstar"] = out["max_s"] / tstar if times else None
        out["tcp_cc_seen"] = cc_seen
        # Retransmitted segments waste the link they cross: the tracker's uplink is the one
        # every byte of a warm pull must cross once.
        d = {k: (tcp1[k][0] - tcp0[k][0], tcp1[k][1] - tcp0[k][1]) for k in tcp1 if k in tcp0}
        nodes = [v for k, v in d.items() if k != "tracker"]
        out["tcp"] = {"tracker": d.get("tracker"),
                      "nodes": (sum(v[0] for v in nodes), sum(v[1] for v in nodes))}
        # Where the losses behind those retransmissions happen: which shaped queues dropped.
        dd = {k: drops1[k] - drops0.get(k, 0) for k in drops1}
        out["qdisc_drops"] = {
            "tracker_up": dd["tracker_up"], "tracker_down": dd["tracker_down"],
            "nodes_up": sum(v for k, v in dd.items() if k.startswith("n") and k.endswith("_up")),
            "nodes_down": sum(v for k, v in dd.items() if k.startswith("n") and k.endswith("_down")),
        }
        out["series"] = self.series(samples, start)
        out["cpu"] = self.cpu_summary(samples, start, wall, svc_cpu0, svc_cpu1, results, irq0, irq1, window)
        out["cpu"]["before"] = quiet
        # The link that bounds the mode: the registry's uplink for direct, the nodes' downlinks else.
        out["progress"] = self.progress(samples, start, results)
        if mode == "direct":
            out["link_util"] = reg_tx * 8 / (wall * a.bandwidth)
        else:
            out["link_util"] = out["node_rx_bytes"] * 8 / (wall * a.nodes * a.bandwidth)
        c = out["cpu"]
        out["bound"] = ("link" if out["link_util"] >= 0.85 else
                        "CPU" if c["busy_avg"] >= 0.9 else "neither")
        if mode in BAY_MODES:
            out.update(self.swarm_stats(mode, blobs, tracker_before))
            out["fallbacks_by_reason"] = self.fallbacks_by_reason()
        if self.chaos:
            out["chaos"] = {"events": chaos_events, "lossy_nodes": self.lossy_nodes,
                            "loss_dropped_packets": (self.loss_drops() - lost0) if self.lossy_nodes else 0}
        done = f"p50 {out['p50_s']:.1f} s, max {out['max_s']:.1f} s" if times else "no node finished"
        log(f"[{mode}] {len(times)}/{a.nodes} ok, {done}; registry sent {fmt_bytes(reg_tx)}; "
            f"CPU busy {100 * out['cpu']['busy_avg']:.0f} % avg; TCP segments retransmitted: "
            + ", ".join(f"{k} {100 * r / max(o, 1):.1f} %" for k, (o, r) in
                        (("tracker", out["tcp"]["tracker"] or (0, 0)), ("nodes", out["tcp"]["nodes"])))
            + "; packets dropped by the shaped queues: "
            + ", ".join(f"{k.replace('_', ' ')}link {v}" for k, v in out["qdisc_drops"].items()))
        return out

    @staticmethod
    def holds(path: Path, blob: dict) -> bool:
        """Whether `path` is the blob: its size and its sha256."""
        if not path.is_file() or path.stat().st_size != blob["size"]:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest() == blob["digest"]

    def start_sampler(self, mode: str) -> subprocess.Popen:
        """A sampler inside the bridge namespace: reads the bridge ports' byte counters from /sys
        and /proc/stat every interval, stamped with the (system-wide) monotonic clock. A process
        of its own (niced up) keeps the stamps honest while the CPU is saturated."""
        script = (
            "import sys,time,json\n"
            "iv=float(sys.argv[1]);ports=sys.argv[2].split(',')\n"
            "def rd(p,f):\n"
            " with open(f'/sys/class/net/{p}/statistics/{f}') as h: return int(h.read())\n"
            "while True:\n"
            " t=time.monotonic()\n"
            " with open('/proc/stat') as h: v=[int(x) for x in h.readline().split()[1:9]]\n"
            " c={p:(rd(p,'rx_bytes'),rd(p,'tx_bytes')) for p in ports}\n"
            " print(json.dumps([t,sum(v)-v[3]-v[4],sum(v),c]),flush=True)\n"
            " time.sleep(iv-(time.monotonic()-t)%iv)\n")
        # Appending to the samples of an earlier run into the same --out would mix them in.
        (self.logs / f"{mode}-samples.jsonl").unlink(missing_ok=True)
        return self.spawn(f"sampler {mode}", self.ns_br,
                          ["nice", "-n", "-10", "python3", "-c", script, str(self.args.sample_interval),
                           ",".join(self.bridge_ports)], f"{mode}-samples.jsonl")

    def stop_sampler(self, p: subprocess.Popen, mode: str) -> list[tuple]:
        self.stop(p, grace=2)
        samples = []
        for line in (self.logs / f"{mode}-samples.jsonl").read_text(errors="replace").splitlines():
            try:
                t, busy, total, counters = json.loads(line)
                samples.append((t, busy, total, {k: tuple(v) for k, v in counters.items()}))
            except (ValueError, TypeError):
                pass  # a line cut short by the stop
        return samples

    def registry_log_lines(self) -> int:
        return len((self.logs / "registry.log").read_text(errors="replace").splitlines())

    def registry_blob_bytes(self, skip: int) -> int:
        """Response bytes of successful blob GETs in the registry's access log since line `skip`."""
        total = 0
        lines = (self.logs / "registry.log").read_text(errors="replace").splitlines()[skip:]
        for line in lines:
            m = re.search(r'"GET (/v2/\S+/blobs/sha256:[0-9a-f]+)\S* HTTP/[0-9.]+" (\d{3}) (\d+)', line)
            if m and 200 <= int(m.group(2)) < 300:
                total += int(m.group(3))
        return total

    def service_cpu(self) -> dict[str, float]:
        cpu = {}
        if self.registry:
            cpu["registry"] = proc_cpu_seconds(self.registry.pid)
        if self.tracker:
            cpu["tracker"] = proc_cpu_seconds(self.tracker.pid)
        cpu["proxies"] = sum(proc_cpu_seconds(p.pid) for p in self.proxies)
        return cpu

    def series(self, samples: list[tuple], start: float) -> list[dict]:
        """Per-interval CPU busy fraction (of all cores), registry send and node receive rates."""
        a = self.args
        rows = []
        for (t0, b0, tot0, c0), (t1, b1, tot1, c1) in zip(samples, samples[1:]):
            dt_ = t1 - t0
            rx = sum(c1[f"p-n{i}"][1] - c0[f"p-n{i}"][1] for i in range(a.nodes))
            tx = sum(c1[f"p-n{i}"][0] - c0[f"p-n{i}"][0] for i in range(a.nodes))
            rows.append({
                "t": round(t1 - start, 3),
                "cpu_busy": (b1 - b0) / max(1, tot1 - tot0),
                "registry_tx_bps": (c1["p-reg"][0] - c0["p-reg"][0]) * 8 / dt_,
                "nodes_rx_bps": rx * 8 / dt_,
                "nodes_tx_bps": tx * 8 / dt_,
                "tracker_tx_bps": (c1["p-trk"][0] - c0["p-trk"][0]) * 8 / dt_ if "p-trk" in c1 else 0.0,
            })
        return rows

    def progress(self, samples: list[tuple], start: float, results: list[dict]) -> dict:
        """Each node's download over time from its link's byte counter: the fraction of what it
        had received by its completion, the time it reached 95 % and the tail after that."""
        nodes = []
        for r in results:
            i = r["node"]
            port = f"p-n{i}"
            before = [c[port][1] for (t, _, _, c) in samples if t <= start]
            base = before[-1] if before else samples[0][3][port][1] if samples else 0
            if "seconds" not in r or not samples:
                nodes.append({"node": i, "t95_s": None, "tail_s": None, "curve": []})
                continue
            end = start + r["seconds"]
            after = [c[port][1] for (t, _, _, c) in samples if t >= end]
            total = (after[0] if after else samples[-1][3][port][1]) - base
            curve = [[round(t - start, 2), round(min(1.0, (c[port][1] - base) / total), 4) if total else 1.0]
                     for (t, _, _, c) in samples if start <= t <= end + self.args.sample_interval]
            t95 = next((t for t, f in curve if f >= 0.95), r["seconds"])
            t95 = min(t95, r["seconds"])
            nodes.append({"node": i, "t95_s": t95, "tail_s": r["seconds"] - t95, "curve": curve})
        done = [n for n in nodes if n["t95_s"] is not None]
        return {"nodes": nodes,
                "t95_max_s": max((n["t95_s"] for n in done), default=None),
                "tail_max_s": max((n["tail_s"] for n in done), default=None)}

    def cpu_summary(self, samples, start, wall, svc0, svc1, results, irq0, irq1, window) -> dict:
        inside = [(b, t) for (ts, b, t, _) in samples if start - 1e-3 <= ts <= start + wall + self.args.sample_interval]
        busy = (inside[-1][0] - inside[0][0]) / max(1, inside[-1][1] - inside[0][1]) if len(inside) > 1 else 0.0
        rows = self.series(samples, start)
        peak = max((r["cpu_busy"] for r in rows if 0 <= r["t"] <= wall + self.args.sample_interval), default=0.0)
        per_role = {k: svc1.get(k, 0.0) - svc0.get(k, 0.0) for k in svc1}
        per_role["clients"] = sum(r.get("cpu_s", 0.0) for r in results)
        busy_s = (irq1[0] - irq0[0]) / CLK_TCK
        irq_s = (irq1[2] - irq0[2]) / CLK_TCK
        ours = sum(per_role.values())
        return {"cores": os.cpu_count(), "busy_avg": busy, "busy_peak": peak, "window_s": window,
                "busy_core_s": busy_s, "ours_core_s": ours, "irq_core_s": irq_s,
                "other_core_s": max(0.0, busy_s - ours - irq_s),
                "saturated_fraction": (sum(1 for r in rows if 0 <= r["t"] <= wall and r["cpu_busy"] >= 0.9)
                                       / max(1, sum(1 for r in rows if 0 <= r["t"] <= wall))),
                "cpu_seconds": per_role}

    def swarm_stats(self, mode: str, blobs: list[dict], tracker_before: dict) -> dict:
        """Proxy and tracker counters after the pulls, once every proxy holds every blob."""
        stats = []
        deadline = time.monotonic() + 30
        for i in range(self.args.nodes):
            url = f"http://{self.node_ips[i]}:{self.args.proxy_port}/_bay/stats"
            while True:
                try:
                    s = self.http_json(self.ns_nodes[i], url)
                except (RuntimeError, json.JSONDecodeError, subprocess.TimeoutExpired) as e:
                    s = {"error": str(e)}
                if s.get("blobs_held", 0) >= len(blobs) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            stats.append(s)
        tracker_after = self.http_json(self.ns_trk, f"{self.tracker_url}/v1/stats")
        keys = ("blobs_served", "cache_hits", "swarm_downloads", "fallbacks", "bytes_from_peers",
                "bytes_from_trackers", "bytes_from_upstream", "blobs_held", "bytes_held")
        proxy_totals = {k: sum(int(s.get(k, 0) or 0) for s in stats) for k in keys}
        tracker_delta = {k: v - tracker_before.get(k, 0) if isinstance(v, (int, float)) else v
                         for k, v in tracker_after.items()}
        # One info line per blob: "blob downloaded from the swarm" with from_peers / from_trackers.
        lines = {"swarm_blobs": 0, "from_peers": 0, "from_trackers": 0, "size": 0, "steals": 0,
                 "upstream_fallback_lines": 0}
        for i in range(self.args.nodes):
            text = (self.logs / f"{mode}-proxy-n{i}.log").read_text(errors="replace")
            for line in text.splitlines():
                if "blob downloaded from the swarm" in line:
                    f = dict(re.findall(r"\b(\w+)=(\d+)\b", line))
                    lines["swarm_blobs"] += 1
                    lines["from_peers"] += int(f.get("from_peers", 0))
                    lines["from_trackers"] += int(f.get("from_trackers", 0))
                    lines["size"] += int(f.get("size", 0))
                    lines["steals"] += int(f.get("steals", 0))
                elif "streaming from upstream" in line or "continuing from upstream" in line:
                    lines["upstream_fallback_lines"] += 1
        # bay's own ledger (the stats endpoints' "savings"): bytes proxies served to clients
        # against bytes the tracker and proxies fetched upstream, during this mode.
        served = sum(int(s.get("savings", {}).get("total", {}).get("bytes_served", 0)) for s in stats)
        proxy_up = sum(int(s.get("savings", {}).get("total", {}).get("bytes_from_upstream", 0))
                       for s in stats)
        trk_up = (tracker_after.get("savings", {}).get("total", {}).get("bytes_from_upstream", 0)
                  - tracker_before.get("savings", {}).get("total", {}).get("bytes_from_upstream", 0))
        savings = {"served_to_clients": served, "fetched_upstream": proxy_up + trk_up,
                   "saved": max(0, served - proxy_up - trk_up)}
        return {"proxy_stats": stats, "proxy_totals": proxy_totals, "tracker_stats": tracker_after,
                "tracker_delta": tracker_delta, "proxy_log_totals": lines, "savings": savings}

    # -- teardown --------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.stop_all([p for _, p in self.procs.values()])
        self.procs.clear()
        for ns in reversed(self.namespaces):
            # Anything still running in our namespaces was started by us: end it by PID.
            r = run(["ip", "netns", "pids", ns], check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        if self.allowed_cc is not None:
            ALLOWED_CC.write_text(self.allowed_cc)
            self.allowed_cc = None
        if self.own_work and not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        elif self.args.keep_work:
            log(f"scratch kept in {self.work}")


# ---------------------------------------------------------------------------------------------
# Report

def machine_info(bin_dir: Path) -> dict:
    def first(cmd):
        try:
            return run(cmd, check=False).stdout.strip().splitlines()[0]
        except (IndexError, OSError, subprocess.TimeoutExpired):
            return None
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), None)
    mem = next((int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), None)
    repo = Path(__file__).resolve().parent.parent
    commit = first(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], check=False).stdout.split("\n")
    dirty = [l.strip() for l in dirty if l.strip()]
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_bytes": mem, "kernel": platform.release(),
            "skopeo": first(["skopeo", "--version"]), "docker_registry": first(["docker-registry", "--version"]),
            "bay_commit": commit, "bay_tree_changes": dirty,
            "bay_proxy_mtime": dt.datetime.fromtimestamp((bin_dir / "bay-proxy").stat().st_mtime).isoformat(timespec="seconds")}


def targets(res: dict, n: int) -> list[dict]:
    modes = res["modes"]
    S = res["image"]["S"]
    out = []

    def add(name, value, limit, applies=True, stated="N=16"):
        if value is None:
            out.append({"target": name, "value": None, "limit": limit, "pass": False, "note": "not measured"})
        else:
            out.append({"target": name, "value": value, "limit": limit, "pass": value <= limit,
                        "note": "" if applies else f"target is stated for {stated}"})

    if res["params"].get("blob"):
        # Issue 21: one layer-sized blob, every node a plain GET at once, against aria2c.
        small = S <= 16 << 20
        stated = "N=8, 100 Mbit/s" + (", 16 MiB" if small else ", 64 MiB")
        fits = n == 8 and res["params"]["bandwidth_bps"] == 100_000_000 and S in (16 << 20, 64 << 20)
        if "warm" in modes:
            add("warm: slowest node / T*", modes["warm"]["max_over_tstar"], 2.0 if small else 1.5, fits, stated)
            add("warm: tracker egress / S", modes["warm"]["tracker_tx_bytes"] / S, 1.1)
        if "cold" in modes and not small:
            add("cold: slowest node / T*", modes["cold"]["max_over_tstar"], 2.0, fits, stated)
        anchor = modes.get("aria2", {}).get("max_s")
        for name in BAY_MODES:
            if name in modes and anchor and modes[name]["max_s"]:
                add(f"{name}: slowest node, bay / aria2c (ahead of it: < 1)", modes[name]["max_s"] / anchor, 1.0)
        return out

    chaos = res["params"].get("chaos")
    if chaos:
        # Issue 20's bar with every fault on: all pulls verified, warm within 2 T*, upstream 1.1 S.
        for name, m in modes.items():
            if name != "direct":
                add(f"{name}: pulls not verified (of {n})", n - m["ok"], 0)
        if "warm" in modes:
            add("warm: slowest node / T* (chaos)", modes["warm"]["max_over_tstar"], 2.0, n == 16)
        swarm = [m for m in ("cold", "warm") if m in modes]
        if swarm:
            up = sum(modes[m]["upstream_iface_bytes"] for m in swarm) / S
            add(f"upstream bytes / S ({' + '.join(swarm)}, registry interface, chaos)", up, 1.1)
        return out
    if "warm" in modes:
        w = modes["warm"]
        add("warm: slowest node / T*", w["max_over_tstar"], 1.3, n == 16)
        if "direct" in modes and w["max_s"] and modes["direct"]["max_s"]:
            add("warm: bay / direct (slowest node)", w["max_s"] / modes["direct"]["max_s"], 1.5 / n, n == 16)
    if "cold" in modes:
        add("cold: slowest node / T*", modes["cold"]["max_over_tstar"], 2.3)
    swarm = [m for m in ("cold", "warm") if m in modes]
    if swarm:
        up = sum(modes[m]["upstream_iface_bytes"] for m in swarm) / S
        add(f"upstream bytes / S ({' + '.join(swarm)}, registry interface)", up, 1.05)
    return out


def table(res: dict) -> str:
    modes = res["modes"]
    S = res["image"]["S"]
    n = res["params"]["nodes"]
    direct_max = modes.get("direct", {}).get("max_s")
    f = lambda v, spec=".1f": "–" if v is None else format(v, spec)
    rows = ["| mode | ok | p50 s | p90 s | max s | max/T* | bay/direct | upstream/S (iface) | "
            "upstream blob GETs/S | seed up/S | proxy↔proxy /S | from tracker /S | fallbacks | CPU busy avg / peak | "
            "link use | bound by |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODES:
        if name not in modes:
            continue
        m = modes[name]
        bd = m["max_s"] / direct_max if (direct_max and m["max_s"] and name != "direct") else None
        if name not in BAY_MODES:
            seed = p2p = trk = fb = None
        else:
            seed = m["tracker_delta"].get("seed_uploaded_bytes", 0) / S
            p2p = m["proxy_totals"]["bytes_from_peers"] / S
            trk = m["proxy_totals"]["bytes_from_trackers"] / S
            fb = m["proxy_totals"]["fallbacks"]
        rows.append(
            f"| {name} | {m['ok']}/{n} | {f(m['p50_s'])} | {f(m['p90_s'])} | {f(m['max_s'])} | "
            f"{f(m['max_over_tstar'], '.2f')} | {f(bd, '.3f')} | {m['upstream_iface_bytes'] / S:.3f} | "
            f"{m['upstream_blob_bytes'] / S:.3f} | {f(seed, '.2f')} | {f(p2p, '.2f')} | {f(trk, '.2f')} | "
            f"{'–' if fb is None else fb} | {100 * m['cpu']['busy_avg']:.0f} % / {100 * m['cpu']['busy_peak']:.0f} % | "
            f"{100 * m['link_util']:.0f} % | {m['bound']}{'*' if others_share(m) > 0.1 else ''} |")
    if res["params"].get("blob"):
        rows += ["", "| mode | slowest node s | max/T* | all nodes at 95 % s | longest tail (95 %→done) s | "
                 "tracker egress /S | nodes' uplinks used |", "|---|---|---|---|---|---|---|"]
        for name in MODES:
            if name not in modes:
                continue
            m = modes[name]
            pr = m.get("progress", {})
            up = m["node_tx_bytes"] * 8 / (m["wall_s"] * n * res["params"]["bandwidth_bps"])
            rows.append(f"| {name} | {f(m['max_s'])} | {f(m['max_over_tstar'], '.2f')} | {f(pr.get('t95_max_s'))} | "
                        f"{f(pr.get('tail_max_s'))} | {m['tracker_tx_bytes'] / S:.2f} | {100 * up:.0f} % |")
        for name in BAY_MODES:
            if name in modes and modes[name].get("proxy_stats"):
                per = [f"n{i} {s_.get('bytes_from_peers', 0) / 2**20:.0f}/{s_.get('bytes_from_trackers', 0) / 2**20:.0f}"
                       f"/{s_.get('bytes_from_upstream', 0) / 2**20:.0f}"
                       for i, s_ in enumerate(modes[name]["proxy_stats"])]
                rows += ["", f"{name}: MiB per node from peers / trackers / upstream: {', '.join(per)}"]
    for name in MODES:
        sv = modes.get(name, {}).get("savings")
        if sv and sv["served_to_clients"]:
            rows.append("")
            rows.append(f"{name}: bay's savings ledger: proxies served {sv['served_to_clients'] / 2**20:.0f} MiB "
                        f"to clients, bay fetched {sv['fetched_upstream'] / 2**20:.0f} MiB upstream "
                        + (f"({sv['served_to_clients'] / sv['fetched_upstream']:.1f}x)." if sv['fetched_upstream']
                           else "(nothing: all from the swarm)."))
    if any(others_share(m) > 0.1 for m in modes.values()):
        rows.append("")
        rows.append("\\* other processes on this shared machine (not this benchmark) used " + ", ".join(
            f"{100 * others_share(m):.0f} % ({name})" for name, m in modes.items() if others_share(m) > 0.1)
            + " of the CPU during the mode: the CPU-related numbers of those modes are distorted.")
    return "\n".join(rows)


def others_share(m: dict) -> float:
    c = m["cpu"]
    return c.get("other_core_s", 0.0) / (c["cores"] * c.get("window_s", m["wall_s"]))


def target_lines(res: dict) -> str:
    lines = []
    for t in res["targets"]:
        v = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = "–" if t["value"] is None else ("PASS" if t["pass"] else "FAIL")
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"- {t['target']}: {v} vs ≤ {t['limit']:.3f}: **{verdict}**{note}")
    return "\n".join(lines)


def swarm_walls_any(res: dict) -> bool:
    return any(n != "direct" for n in res["modes"])


def plot(res: dict, out: Path) -> Path | None:
    if not shutil.which("gnuplot"):
        log("gnuplot missing: no plot (apt-get install gnuplot-nox)")
        return None
    data = out / "plot-data"
    data.mkdir(exist_ok=True)
    p = res["params"]
    tstar = res["modes"][next(iter(res["modes"]))]["tstar_s"]
    colors = {"direct": "#d62728", "cold": "#1f77b4", "warm": "#2ca02c", "aria2": "#9467bd"}
    cdf_plots, cpu_plots, rate_plots = [], [], []
    xmax = tstar * 1.2
    for name, m in res["modes"].items():
        times = sorted(r["seconds"] for r in m["nodes"] if r["ok"])
        with open(data / f"{name}-cdf.dat", "w") as fh:
            fh.write("0 0\n")
            for i, t in enumerate(times):
                fh.write(f"{t:.3f} {i / p['nodes']:.4f}\n{t:.3f} {(i + 1) / p['nodes']:.4f}\n")
        with open(data / f"{name}-series.dat", "w") as fh:
            for r in m["series"]:
                fh.write(f"{r['t']:.3f} {100 * r['cpu_busy']:.2f} {100 * r['nodes_rx_bps'] / (p['nodes'] * p['bandwidth_bps']):.2f}\n")
        xmax = max([xmax] + times)
        c = colors[name]
        label = f"{name} (max {m['max_s']:.1f} s)" if m["max_s"] else f"{name} (failed)"
        cdf_plots.append(f"'{data}/{name}-cdf.dat' using 1:2 with lines lw 2 lc rgb '{c}' title '{label}'")
        cpu_plots.append(f"'{data}/{name}-series.dat' using 1:2 with lines lw 1.5 lc rgb '{c}' title '{name}'")
        rate_plots.append(f"'{data}/{name}-series.dat' using 1:3 with lines lw 1.5 lc rgb '{c}' title '{name}'")
    direct_note = (f"; direct runs on to {res['modes']['direct']['wall_s']:.0f} s"
                   if "direct" in res["modes"] and swarm_walls_any(res) else "")
    swarm_walls = [m["wall_s"] for n, m in res["modes"].items() if n != "direct"]
    # The direct mode's series is flat and long: the time panels show the swarm modes' span.
    series_xmax = f"{1.1 * max(swarm_walls) + 1:.1f}" if swarm_walls else "*"
    png = out / "cdf.png"
    title = (f"bay swarm benchmark: N={p['nodes']}, S={fmt_bytes(res['image']['S'])}, "
             f"B={fmt_rate(p['bandwidth_bps'])} per link, T*=S/B={tstar:.1f} s")
    script = f"""
set terminal pngcairo size 1100,1250 font ',10'
set output '{png}'
set multiplot layout 3,1 title '{title}'
set grid
set key left top
set logscale x
set format x '%g'
set xtics (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
set mxtics 10
set xrange [{max(0.5, tstar / 8):.2f}:{xmax * 1.15:.2f}]
set yrange [0:1.02]
set xlabel 'completion time since all pulls started (s, log scale)'
set ylabel 'fraction of nodes done'
set title 'completion-time CDF'
set arrow 1 from {tstar:.3f}, graph 0 to {tstar:.3f}, graph 1 nohead dt 2 lw 2 lc rgb 'black'
set label 1 'T*' at {tstar:.3f}, graph 1.03 center
set arrow 2 from {1.3 * tstar:.3f}, graph 0 to {1.3 * tstar:.3f}, graph 1 nohead dt 3 lc rgb '#2ca02c'
set label 2 '1.3T*' at {1.3 * tstar:.3f}, graph 0.05 left offset 0.3,0 tc rgb '#2ca02c'
set arrow 3 from {2.3 * tstar:.3f}, graph 0 to {2.3 * tstar:.3f}, graph 1 nohead dt 3 lc rgb '#1f77b4'
set label 3 '2.3T*' at {2.3 * tstar:.3f}, graph 0.05 left offset 0.3,0 tc rgb '#1f77b4'
set arrow 4 from {p['nodes'] * tstar:.3f}, graph 0 to {p['nodes'] * tstar:.3f}, graph 1 nohead dt 3 lc rgb '#d62728'
set label 4 'N·T*' at {p['nodes'] * tstar:.3f}, graph 0.05 left offset 0.3,0 tc rgb '#d62728'
plot {', '.join(cdf_plots)}
unset arrow; unset label; unset logscale x; unset xtics; set xtics; set mxtics default
set xrange [0:{series_xmax}]
set yrange [0:105]
set title 'CPU busy, all {os.cpu_count()} cores (sampled every {p['sample_interval']} s){direct_note}'
set ylabel 'CPU busy %'
set xlabel 'time since the pulls started (s)'
plot {', '.join(cpu_plots)}
set yrange [0:*]
set title 'sum of node download rates, % of N x B'
set ylabel '% of N x B'
plot {', '.join(rate_plots)}
unset multiplot
"""
    return draw(script, data / "plot.gp", png)


def draw(script: str, script_path: Path, png: Path) -> Path | None:
    """Runs a gnuplot script that writes `png`; on failure logs why and returns None."""
    script_path.write_text(script)
    r = run(["gnuplot", str(script_path)], check=False)
    if r.returncode != 0:
        log(f"gnuplot failed on {png.name}: {r.stderr.strip()[-500:]}")
        return None
    return png


def plot_progress(res: dict, out: Path) -> Path | None:
    """progress.png: every node's download over time, one panel per swarm mode (--blob runs)."""
    modes = [(n, m) for n, m in res["modes"].items() if n != "direct" and m.get("progress", {}).get("nodes")]
    if not modes or not shutil.which("gnuplot"):
        return None
    data = out / "plot-data"
    data.mkdir(exist_ok=True)
    tstar = modes[0][1]["tstar_s"]
    xmax = max(m["max_s"] or m["wall_s"] for _, m in modes) * 1.05
    panels = []
    for name, m in modes:
        plots = []
        for node in m["progress"]["nodes"]:
            f = data / f"{name}-progress-n{node['node']}.dat"
            f.write_text("".join(f"{t} {100 * v}\n" for t, v in node["curve"]))
            plots.append(f"'{f}' using 1:2 with lines lw 1.2 notitle")
        pr = m["progress"]
        panels.append(
            f"set title '{name}: slowest {m['max_s'] or 0:.1f} s = {m['max_over_tstar'] or 0:.2f} T*, all at 95 % by "
            f"{pr['t95_max_s'] or 0:.1f} s, longest tail {pr['tail_max_s'] or 0:.1f} s'\n"
            f"plot {', '.join(plots)}")
    png = out / "progress.png"
    p = res["params"]
    script = f"""set terminal pngcairo size 1100,{320 * len(panels) + 60} font 'sans,10'
set output '{png}'
set multiplot layout {len(panels)},1 title 'per-node download progress: N={p['nodes']}, S={fmt_bytes(res['image']['S'])}, B={fmt_rate(p['bandwidth_bps'])}, T*={tstar:.1f} s'
set xrange [0:{xmax:.1f}]
set yrange [0:102]
set xlabel 'time since the pulls started (s)'
set ylabel '% of the bytes it received'
set arrow 1 from {tstar:.3f}, graph 0 to {tstar:.3f}, graph 1 nohead dt 2 lw 2 lc rgb 'black'
set grid
{chr(10).join(panels)}
unset multiplot
"""
    return draw(script, data / "progress.gp", png)


def report(res: dict, out: Path, png: Path | None) -> str:
    p, img = res["params"], res["image"]
    S = img["S"]
    what = "one blob, GET with curl" if p.get("blob") else f"{img['layers']} layers + config"
    lines = [
        f"## N={p['nodes']}, S={fmt_bytes(S)} ({what}), B={fmt_rate(p['bandwidth_bps'])}",
        "",
        f"T* = S/B = {res['modes'][next(iter(res['modes']))]['tstar_s']:.1f} s; "
        + (f"link check: {res['link_check']['goodput_bps'] / 1e6:.1f} Mbit/s TCP goodput "
           f"({100 * res['link_check']['fraction_of_B']:.1f} % of B). " if res.get("link_check") else "")
        + (f"TCP congestion control: {p['tcp_cc']}"
           + (f", {p['tcp_cc_route']} on the subnet route" if p.get("tcp_cc_route") else "") + ". "
           if p.get("tcp_cc") else "")
        + f"Command: `{res['command']}`",
        "",
        table(res),
        "",
        "Targets:",
        target_lines(res),
        "",
    ]
    for name, m in res["modes"].items():
        c = m["cpu"]
        gib = m["node_rx_bytes"] / (1 << 30)
        secs = ", ".join(f"{k} {v:.0f} s ({v / gib:.1f} s/GiB)" for k, v in c["cpu_seconds"].items() if v >= 0.5)
        share = c["ours_core_s"] / (c["cores"] * c["window_s"])
        extra = ""
        if name in BAY_MODES:
            lt = m["proxy_log_totals"]
            extra = (f"; proxy log: {lt['swarm_blobs']} swarm blobs, from_peers {fmt_bytes(lt['from_peers'])}, "
                     f"from_trackers {fmt_bytes(lt['from_trackers'])}, "
                     f"fetched twice {duplicate_share(lt)}, {lt.get('steals', 0)} piece steals, "
                     f"{lt['upstream_fallback_lines']} upstream-fallback lines; "
                     f"tracker upstream_fetches +{m['tracker_delta'].get('upstream_fetches', 0)}")
        lines.append(f"- {name}: wall {m['wall_s']:.1f} s; nodes received {m['node_rx_bytes'] / S:.2f}×S, "
                     f"sent {m['node_tx_bytes'] / S:.2f}×S, tracker sent {m['tracker_tx_bytes'] / S:.2f}×S; "
                     f"CPU {100 * c['busy_avg']:.0f} % avg, ≥90 % busy in {100 * c['saturated_fraction']:.0f} % of "
                     f"samples; over {c['window_s']:.1f} s this benchmark's processes used {c['ours_core_s']:.0f} core-s = "
                     f"{100 * share:.0f} % of the machine; CPU seconds (per GiB the nodes received): {secs}; all busy {c['busy_core_s']:.0f} core-s of which "
                     f"irq/softirq {c['irq_core_s']:.0f}, other processes (not this benchmark) ≈ {c['other_core_s']:.0f}; "
                     f"CPU busy before start {fmt_pct(c['before']['busy_before'])}"
                     f"{'' if c['before']['quiet'] else ' (NOT quiet)'}{extra}"
                     + (f"; TCP connections at T*/2 (n0 + {'tracker' if name != 'direct' else 'registry'}) by "
                        "congestion control: " + ", ".join(f"{k} {v}" for k, v in sorted(m["tcp_cc_seen"].items()))
                        if m.get("tcp_cc_seen") else ""))
    chaos = p.get("chaos")
    if chaos:
        lossy = next((m["chaos"]["lossy_nodes"] for m in res["modes"].values() if m.get("chaos")), [])
        lines += ["", f"Chaos (seed {chaos['seed']}, faults {', '.join(chaos['faults']) or 'none'}): "
                  + (f"{chaos['loss_pct']} % loss both ways on {', '.join(f'n{i}' for i in lossy)}. "
                     if "loss" in chaos["faults"] else "")]
        for name, m in res["modes"].items():
            if name not in BAY_MODES:
                continue
            ev = "; ".join(f"{e['t']:.1f} s {e['event']}" for e in m.get("chaos", {}).get("events", []))
            fb = ", ".join(f"{k} {v}" for k, v in sorted(m.get("fallbacks_by_reason", {}).items()) if v)
            slow = sorted(m["nodes"], key=lambda r: r.get("seconds", 0))[-1]
            lost = m.get("chaos", {}).get("loss_dropped_packets", 0)
            again = [f"n{r['node']} ×{r['attempts']}" for r in m["nodes"] if r.get("attempts", 1) > 1]
            ev += f"; pulls run again: {', '.join(again) if again else 'none'}"
            lines.append(f"- {name}: {ev or 'no events'}; {lost} packets dropped by the loss fault; "
                         f"fallbacks by reason: {fb or 'none'}; "
                         f"slowest n{slow['node']} {slow.get('seconds', 0):.1f} s")
    if png:
        lines += ["", f"Plot: [{png.name}]({png.name}) (next to this file)"]
    if p.get("blob") and (out / "progress.png").exists():
        lines += ["", "Per-node progress: [progress.png](progress.png)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------

def shown_args() -> list[str]:
    """argv without what swarm.sh adds for itself (--run-id, --work-dir)."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--run-id", "--work-dir"):
            skip = True
        elif not a.startswith(("--run-id=", "--work-dir=")):
            out.append(a)
    return out


def main() -> int:
    args = build_parser().parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        sys.exit(f"unknown modes {bad}; choose from {','.join(MODES)}")
    args.modes = [m for m in MODES if m in args.modes]
    if "aria2" in args.modes and not args.blob:
        sys.exit("mode aria2 is the anchor of --blob runs: add --blob")
    if args.blob:
        args.layers = 1
        if args.chaos is not None:
            sys.exit("--chaos runs pull images: drop --blob")
        for tool, pkg in (("aria2c", "aria2"), ("opentracker", "opentracker")) if "aria2" in args.modes else ():
            if not shutil.which(tool):
                sys.exit(f"mode aria2 needs {tool}: apt-get install -y {pkg}")
    if not 1 <= args.nodes <= 200:
        sys.exit("--nodes must be 1..200")
    if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", args.subnet):
        sys.exit("--subnet must be three octets inside 10.0.0.0/8, e.g. 10.251.0")
    if args.chaos is not None:
        args.trackers = 2
        bad = [f for f in args.chaos_faults.split(",") if f and f not in FAULTS]
        if bad:
            sys.exit(f"--chaos-faults: unknown {bad}; choose from {','.join(FAULTS)}")
        if {"kill-tracker", "freeze-tracker"} <= set(args.chaos_faults.split(",")):
            sys.exit("--chaos-faults: kill-tracker and freeze-tracker strike the same tracker; pick one")
    if not 0 < args.loss < 100:
        sys.exit(f"--loss {args.loss}: a percentage between 0 and 100")
    derive_timeouts(args)
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        out = Path(args.replot).parent
        png = plot(res, out)
        if res["params"].get("blob"):
            plot_progress(res, out)
        text = report(res, out, png)
        (out / "results.md").write_text(text)
        print(text)
        return 0
    if args.print_timeout:
        print(int(args.timeout))
        return 0
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, tc): run bench/swarm.sh as root")
    repo = Path(__file__).resolve().parent.parent
    args.bin_dir = args.bin_dir or str(repo / "target" / "release")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or str(repo / "bench" / "out" /
                               f"{stamp}-n{args.nodes}-s{fmt_bytes(args.size).replace(' ', '').replace('.0', '')}"
                               f"-b{args.bandwidth // 10**6}m")
    for b in ("bay-proxy", "bay-tracker"):
        if not os.access(Path(args.bin_dir) / b, os.X_OK):
            sys.exit(f"{Path(args.bin_dir) / b} missing: cargo build --release --bins")

    aborting = []

    def on_signal(signum, _frame):
        if aborting:  # a second Ctrl-C (or timeout's forwarded copy) while unwinding
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
    res_binaries = bench.binaries
    log(f"run {bench.rid}: N={args.nodes}, S={fmt_bytes(args.size)}, B={fmt_rate(args.bandwidth)}, "
        f"modes {','.join(args.modes)}; phase timeout {args.phase_timeout:.0f} s, overall {args.timeout:.0f} s; "
        f"results in {args.out}")
    res: dict = {
        "command": " ".join(["bench/swarm.sh", *shown_args()]),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "params": {"nodes": args.nodes, "size_payload": args.size, "layers": args.layers,
                   "bandwidth_bps": args.bandwidth, "modes": args.modes, "subnet": f"{args.subnet}.0/24",
                   "tc": {"qdisc": "tbf", "latency_ms": args.tc_latency_ms}, "phase_timeout_s": args.phase_timeout,
                   "timeout_s": args.timeout, "proxy_args": args.proxy_arg, "tracker_args": args.tracker_arg,
                   "blob": args.blob,
                   "sample_interval": args.sample_interval, "run_id": bench.rid, "client": "curl" if args.blob else args.client,
                   "trackers": args.trackers,
                   "chaos": ({"seed": args.chaos, "faults": bench.faults, "loss_pct": args.loss}
                             if args.chaos is not None else None)},
        "machine": machine_info(Path(args.bin_dir)),
        "binaries": res_binaries,
        "modes": {},
    }
    status = 0
    try:
        bench.build_network()
        res["params"]["tc"]["burst_bytes"] = bench.tc_burst
        res["params"]["tcp_cc"] = bench.tcp_cc
        res["params"]["tcp_cc_route"] = args.tcp_cc_route or None
        log(f"TCP congestion control in the namespaces: {bench.tcp_cc}"
            + (f", {args.tcp_cc_route} on their subnet route" if args.tcp_cc_route else ""))
        bench.start_registry()
        image = bench.push_image()
        pulled = image["layers"][:1] if args.blob else image["layers"] + [image["config"]]
        S = sum(b["size"] for b in pulled)
        res["image"] = {"S": S, "layers": args.layers, "manifest": image["manifest"]["digest"], "blobs": pulled}
        if not args.no_link_check:
            res["link_check"] = bench.link_check()
        if bench.chaos and "loss" in bench.faults:
            bench.add_loss()
        for mode in args.modes:
            if mode != "direct" and bench.tracker is None:
                bench.start_tracker()
            if mode in BAY_MODES:
                bench.ensure_trackers()
            if mode == "warm" and "cold" not in args.modes:
                bench.prewarm_tracker(image)
            if mode in BAY_MODES:
                bench.start_proxies(mode)
            if mode == "aria2":
                bench.start_anchor(image)
            try:
                res["modes"][mode] = bench.run_mode(mode, image)
            finally:
                bench.stop_proxies()
                bench.stop_anchor()
    except Abort as e:
        log(f"aborted: {e}")
        res["aborted"] = str(e)
        status = 130
    except Exception as e:  # noqa: BLE001 - report, tidy up, fail
        log(f"failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"
        status = 1
    finally:
        signal.alarm(0)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        log("tidying up: processes, namespaces, scratch directory")
        bench.cleanup()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)

    res["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    out = Path(args.out)
    if res["modes"]:
        res["targets"] = targets(res, args.nodes)
        png = plot(res, out)
        res["plot"] = str(png) if png else None
        if args.blob:
            plot_progress(res, out)
        text = report(res, out, png)
        (out / "results.md").write_text(text)
        print(text)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    log(f"results: {out / 'results.json'}")
    if status == 0 and any(m["ok"] < args.nodes for m in res["modes"].values()):
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
