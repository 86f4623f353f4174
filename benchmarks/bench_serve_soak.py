"""Soak test of ``skinlesion serve``: throughput, latency and the server's memory under valid and hostile uploads.

    python benchmarks/bench_serve_soak.py [--run-dir DIR] [--backend torch|onnx] [--img-size 224]
        [--sequential 100] [--requests 500] [--concurrency 8] [--duration 120] [--json out.json]

Starts ``skinlesion serve`` on 127.0.0.1 (a free port) for a run folder (``--run-dir``; by default a throwaway
efficientnet_b0 run with random weights in a temporary folder, as bench_infer.py builds it) and samples the server
process's resident memory (VmRSS in /proc/PID/status) every ~20 ms, plus the kernel's high-water mark (VmHWM,
reset per phase through /proc/PID/clear_refs where allowed). Phases, one line each (requests, req/s, p50/p95 ms,
status codes, errors = 5xx or connection errors, RSS before / peak / after in MiB):

1. warm-up: 10 requests;
2. sequential: ``--sequential`` requests of a ~600x450 JPEG (a HAM10000 original from ../shared when present,
   else noise);
3. concurrent: ``--requests`` requests of the same JPEG from ``--concurrency`` threads;
4. largest valid uploads: an 8000x6000 (48 MP, under the 50 MP limit) smooth-gradient JPEG, 3 times in a row,
   then the same as a PNG (no reduced JPEG decode: the worst case), twice; per-upload RSS rise = peak RSS minus
   the RSS before the upload, the larger of the two kinds (target: < 300 MB);
5. hostile burst at concurrency 8: thin strip, PNG bombs at 49 MP and over 50 MP, truncated / byte-flipped JPEGs,
   text named .jpg, empty upload, 16-bit PNG, CMYK JPEG, palette PNG with transparency, GIF, a > 20 MB body
   (target: only 2xx / 4xx, never 5xx).

Then RSS flatness over phase 3 (RSS after phase 3 minus after phase 2; target within +50 MiB), the RSS change
over the hostile burst, and a PASS / FAIL line per target. Every phase stops at ``--duration`` seconds; the
server is stopped at the end, on Ctrl-C and on errors. Loopback only: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000_originals"
MIB = 1024 * 1024
UPLOAD_RISE_TARGET_MB = 300.0  # MB = 10^6 bytes
FLAT_TARGET_MIB = 50.0
HOSTILE_CONCURRENCY = 8


@dataclass(frozen=True)
class Job:
    """One upload: a kind (for the per-kind table), the file name, its bytes and the declared content type."""

    kind: str
    name: str
    data: bytes
    ctype: str = "image/jpeg"


@dataclass
class PhaseResult:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    wall_s: float = 0.0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_after: float = 0.0
    stopped_early: bool = False

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if not s.isdigit() or s.startswith("5"))

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "requests": self.requests,
            "req_s": self.requests / self.wall_s if self.wall_s else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "statuses": dict(self.statuses),
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
            "errors": self.errors,
            "rss_before_mib": self.rss_before,
            "rss_peak_mib": self.rss_peak,
            "rss_after_mib": self.rss_after,
            "wall_s": self.wall_s,
            "stopped_early": self.stopped_early,
        }


# ---------------------------------------------------------------- host and run folder


def host_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "avx512_bf16": "avx512_bf16" in text}


def make_run(run_dir: Path, img_size: int, backbone: str = "efficientnet_b0") -> None:
    """A checkpoint with random weights, as bench_infer.py builds it: speed and memory do not depend on them."""
    if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling script, also when loaded by path
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_infer import make_run as build

    build(run_dir, backbone, img_size)


def ensure_onnx(run_dir: Path) -> None:
    if not (run_dir / "model.onnx").is_file():
        from skinlesion.inference.onnx_export import export_onnx

        export_onnx(run_dir)


# ---------------------------------------------------------------- payloads


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_image() -> tuple[Image.Image, bytes]:
    """A ~600x450 JPEG: a HAM10000 original (its bytes as they are) when ../shared is present, else noise."""
    files = sorted(SAMPLE_DIR.glob("**/*.jpg"))
    if files:
        data = files[0].read_bytes()
        return Image.open(io.BytesIO(data)).convert("RGB"), data
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (450, 600, 3), dtype=np.uint8))
    return image, encode(image, "JPEG", quality=90)


def gradient(width: int = 8000, height: int = 6000, fmt: str = "JPEG") -> bytes:
    """A smooth RGB gradient: 48 MP decoded, a few MB encoded (well under the 20 MB upload limit). A PNG is
    decoded at full size (no reduced JPEG decode), the worst case for memory."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(rgb), fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def flipped(data: bytes, seed: int, n: int = 64) -> bytes:
    """``n`` random bytes in the middle half of ``data`` XOR-ed with 0xFF."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(n):
        out[rng.randrange(len(out) // 4, 3 * len(out) // 4)] ^= 0xFF
    return bytes(out)


def hostile_kinds(image: Image.Image, jpeg: bytes, upload_mb: float) -> dict[str, list[Job]]:
    """Each hostile kind with its variants (one Job each; repeated by the caller)."""
    gray = np.tile(np.linspace(0, 65535, 600, dtype=np.uint16), (450, 1))
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    big = np.random.default_rng(1).integers(0, 256, int(upload_mb * MIB) + MIB, dtype=np.uint8).tobytes()
    png = "image/png"
    return {
        "strip 1x100000 png": [Job("strip", "strip.png", encode(Image.new("L", (1, 100_000)), "PNG"), png)],
        "bomb 49 MP png": [Job("bomb49", "bomb49.png", encode(Image.new("L", (7000, 7000)), "PNG"), png)],
        "bomb 52 MP png": [Job("bomb52", "bomb52.png", encode(Image.new("L", (8000, 6500)), "PNG"), png)],
        "truncated jpeg": [Job("truncated", "trunc.jpg", jpeg[: len(jpeg) // 2])],
        "byte-flipped jpeg": [Job("flipped", f"flip{i}.jpg", flipped(jpeg, i)) for i in range(8)],
        "text named .jpg": [Job("text", "notes.jpg", b"this is not an image\n" * 200)],
        "empty upload": [Job("empty", "empty.jpg", b"")],
        "16-bit png": [Job("png16", "gray16.png", encode(Image.fromarray(gray), "PNG"), png)],
        "cmyk jpeg": [Job("cmyk", "cmyk.jpg", encode(image.convert("CMYK"), "JPEG", quality=90))],
        "palette png + transparency": [Job("palette", "pal.png", encode(palette, "PNG", transparency=0), png)],
        "gif": [Job("gif", "lesion.gif", encode(image, "GIF"), "image/gif")],
        f"> {upload_mb:g} MB body": [Job("oversize", "huge.jpg", big)],
    }


# ---------------------------------------------------------------- server and memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status_kb(pid: int, key: str) -> float:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in MiB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class RssSampler:
    """VmRSS of a process every ``interval`` s in a background thread; ``mark()`` starts a new peak window."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self._peak = 0.0
        self._hwm_ok = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.now()
            with self._lock:
                self._peak = max(self._peak, rss)

    def now(self) -> float:
        return read_status_kb(self.pid, "VmRSS")

    def mark(self) -> float:
        """Start a peak window (also resets the kernel's VmHWM when allowed); returns the RSS now."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_ok = True
        except OSError:
            self._hwm_ok = False
        rss = self.now()
        with self._lock:
            self._peak = rss
        return rss

    def peak(self) -> float:
        with self._lock:
            peak = self._peak
        return max(peak, read_status_kb(self.pid, "VmHWM")) if self._hwm_ok else peak


@contextmanager
def serve(run_dir: Path, backend: str, env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """``skinlesion serve`` on a free loopback port; yields (base URL, pid); always stopped afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "skinlesion", "serve", "--run-dir", str(run_dir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--backend", backend, "--log-level", "warning"]
    with log.open("wb") as err:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, log)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


# ---------------------------------------------------------------- load


def post(client: httpx.Client, url: str, job: Job) -> tuple[str, float]:
    """(status code or ``conn:<Exception>``, latency ms) of one upload."""
    t = time.perf_counter()
    try:
        status = str(client.post(url + "/api/predict", files={"file": (job.name, job.data, job.ctype)}).status_code)
    except httpx.HTTPError as e:
        status = f"conn:{type(e).__name__}"
    return status, (time.perf_counter() - t) * 1000


def run_phase(name: str, url: str, jobs: list[Job], concurrency: int, duration: float, rss: RssSampler) -> PhaseResult:
    """Send ``jobs`` from ``concurrency`` threads (one httpx client each) until done or ``duration`` s passed."""
    res = PhaseResult(name)
    pending = iter(jobs)
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        with httpx.Client(timeout=max(duration, 30)) as client:
            while time.monotonic() < stop_at:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                status, ms = post(client, url, job)
                with lock:
                    res.latencies_ms.append(ms)
                    res.statuses[status] += 1
                    res.by_kind.setdefault(job.kind, Counter())[status] += 1

    res.rss_before = rss.mark()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.wall_s = time.perf_counter() - t0
    res.stopped_early = res.requests < len(jobs)
    time.sleep(0.3)  # let freed memory settle before the "after" reading
    res.rss_peak, res.rss_after = rss.peak(), rss.now()
    return res


def large_phase(
    url: str, job: Job, repeats: int, duration: float, rss: RssSampler, name: str = "largest valid upload"
) -> tuple[PhaseResult, list[float]]:
    """The largest valid upload ``repeats`` times in a row: merged result and each upload's own RSS rise (MiB)."""
    parts = [run_phase("large", url, [job], 1, duration, rss) for _ in range(repeats)]
    merged = PhaseResult(name, rss_before=parts[0].rss_before, rss_after=parts[-1].rss_after)
    for p in parts:
        merged.latencies_ms += p.latencies_ms
        merged.statuses.update(p.statuses)
        merged.wall_s += p.wall_s
        merged.rss_peak = max(merged.rss_peak, p.rss_peak)
        merged.stopped_early |= p.stopped_early
    return merged, [p.rss_peak - p.rss_before for p in parts]


# ---------------------------------------------------------------- report


def phase_line(res: PhaseResult) -> str:
    s = res.summary()
    codes = " ".join(f"{k}x{v}" for k, v in sorted(res.statuses.items()))
    early = " (stopped at --duration)" if res.stopped_early else ""
    return (
        f"{res.name:22}{s['requests']:6d}{s['req_s']:9.1f}{s['p50_ms']:10.1f}{s['p95_ms']:10.1f}{s['errors']:7d}"
        f"   {res.rss_before:7.0f} / {res.rss_peak:7.0f} / {res.rss_after:7.0f}   {codes}{early}"
    )


def header() -> str:
    return (
        f"{'phase':22}{'reqs':>6}{'req/s':>9}{'p50 ms':>10}{'p95 ms':>10}{'errors':>7}"
        f"   {'RSS MiB before / peak / after':>29}   status codes"
    )


def kind_table(res: PhaseResult, labels: dict[str, str]) -> list[str]:
    lines = [f"  {'hostile kind':30} status counts"]
    for kind, counts in res.by_kind.items():
        bad = any(not s.isdigit() or s.startswith("5") for s in counts)
        lines.append(f"  {labels.get(kind, kind):30} {' '.join(f'{k}x{v}' for k, v in sorted(counts.items()))}"
                     + ("   <-- 5xx / connection error" if bad else ""))  # fmt: skip
    return lines


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="a trained run folder (default: a throwaway random-weight run)")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    ap.add_argument("--img-size", type=int, default=224, help="model input size of the throwaway run")
    ap.add_argument("--sequential", type=int, default=100, help="phase 2 requests")
    ap.add_argument("--requests", type=int, default=500, help="phase 3 requests")
    ap.add_argument("--concurrency", type=int, default=8, help="phase 3 client threads")
    ap.add_argument("--hostile-repeats", type=int, default=8, help="requests per hostile kind")
    ap.add_argument("--duration", type=float, default=120.0, help="cap on each phase, seconds")
    ap.add_argument("--upload-mb", type=float, default=20.0, help="the server's --max-upload-mb (its default)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    ap.add_argument("--json", type=Path, help="write every number here")
    return ap.parse_args(argv)


def soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """The five phases against a running server; prints as it goes and returns the numbers."""
    image, jpeg = sample_image()
    sample = Job("sample", "lesion.jpg", jpeg)
    large = Job("large", "large.jpg", gradient())
    large_png = Job("large_png", "large.png", gradient(fmt="PNG"), "image/png")
    kinds = hostile_kinds(image, jpeg, args.upload_mb)
    labels = {jobs[0].kind: label for label, jobs in kinds.items()}
    hostile = [j for jobs in kinds.values() for j in jobs * max(1, args.hostile_repeats // len(jobs))]
    random.Random(0).shuffle(hostile)
    print(f"# sample JPEG {image.width}x{image.height} {len(jpeg) / 1024:.0f} kB; largest valid uploads 8000x6000 "
          f"JPEG {len(large.data) / MIB:.1f} MiB and PNG {len(large_png.data) / MIB:.1f} MiB; hostile burst "
          f"{len(hostile)} requests")  # fmt: skip
    print(header())
    phases: dict[str, PhaseResult] = {}
    with RssSampler(pid) as rss:
        plan = [
            ("warm-up", [sample] * 10, 1),
            ("sequential", [sample] * args.sequential, 1),
            (f"concurrent x{args.concurrency}", [sample] * args.requests, args.concurrency),
        ]
        for name, jobs, conc in plan:
            phases[name.split()[0]] = res = run_phase(name, url, jobs, conc, args.duration, rss)
            print(phase_line(res), flush=True)
        phases["large"], rises = large_phase(url, large, 3, args.duration, rss)
        print(phase_line(phases["large"]) + f"   per-upload rise MiB: {', '.join(f'{r:.0f}' for r in rises)}")
        phases["large_png"], png_rises = large_phase(url, large_png, 2, args.duration, rss, "largest valid PNG")
        print(phase_line(phases["large_png"]) + f"   per-upload rise MiB: {', '.join(f'{r:.0f}' for r in png_rises)}")
        rises += png_rises
        name = f"hostile x{HOSTILE_CONCURRENCY}"
        phases["hostile"] = run_phase(name, url, hostile, HOSTILE_CONCURRENCY, args.duration, rss)
        print(phase_line(phases["hostile"]))
        print("\n".join(kind_table(phases["hostile"], labels)), flush=True)
    return report(phases, rises)


def report(phases: dict[str, PhaseResult], rises: list[float]) -> dict[str, Any]:
    rise = max(phases[k].rss_peak - phases[k].rss_before for k in ("large", "large_png"))
    answered = phases["large"].statuses == {"200": 3} and phases["large_png"].statuses == {"200": 2}
    flat = phases["concurrent"].rss_after - phases["sequential"].rss_after
    hostile_delta = phases["hostile"].rss_after - phases["hostile"].rss_before
    no_5xx = all(p.errors == 0 for p in phases.values())
    complete = not any(p.stopped_early for p in phases.values())
    targets = {
        "per_upload_rise_lt_300MB": rise * MIB < UPLOAD_RISE_TARGET_MB * 1e6 and answered,
        "flat_over_concurrent": flat <= FLAT_TARGET_MIB and not phases["concurrent"].stopped_early,
        "no_5xx": no_5xx,
    }
    print(
        f"\nper-upload RSS rise (48 MP JPEG and PNG uploads, largest peak - before): {rise:.0f} MiB = "
        f"{rise * MIB / 1e6:.0f} MB (target < {UPLOAD_RISE_TARGET_MB:g} MB; all answered 200: {answered})"
    )
    print(
        f"RSS flatness over phase 3 ({phases['concurrent'].requests} requests): {flat:+.1f} MiB "
        f"(target <= +{FLAT_TARGET_MIB:g} MiB)"
    )
    print(f"RSS over the hostile burst (after - before): {hostile_delta:+.1f} MiB")
    if not complete:
        print("note: a phase stopped at --duration before sending all its requests")
    print(f"targets: per-upload rise < 300 MB: {verdict(targets['per_upload_rise_lt_300MB'])}; "
          f"flat over {phases['concurrent'].requests} requests: {verdict(targets['flat_over_concurrent'])}; "
          f"no 5xx: {verdict(no_5xx)}")  # fmt: skip
    return {
        "phases": {k: p.summary() for k, p in phases.items()},
        "per_upload_rise_mib": rise,
        "per_upload_rises_mib": rises,
        "flatness_mib": flat,
        "hostile_rss_delta_mib": hostile_delta,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on `kill` too
    env = dict(kv.split("=", 1) for kv in args.env)
    host = host_info()
    print(f"# host: {host['cpu']}, {host['cores']} cores ({host['usable_cores']} usable), "
          f"avx512_bf16: {'yes' if host['avx512_bf16'] else 'no'}; backend {args.backend}"
          + (f"; server env {env}" if env else ""))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            run_dir = Path(tmp) / "bench"
            make_run(run_dir, args.img_size)
        if args.backend == "onnx":
            ensure_onnx(run_dir)
        log = Path(tmp) / "server.log"
        try:
            with serve(run_dir, args.backend, env, log) as (url, pid):
                print(f"# server pid {pid} at {url}, run {run_dir}")
                result = soak(url, pid, args)
        finally:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            if "Traceback" in tail or "ERROR" in tail:
                print(f"\n# server log tail:\n{tail}")
    result.update(host=host, args={k: str(v) for k, v in vars(args).items()})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
