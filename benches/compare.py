#!/usr/bin/env python3
"""CPU per frame of kvs-frames beside ffmpeg and Python OpenCV, measured side by side.

`make bench-compare` (or `python3 benches/compare.py [--runs N] [--seconds S]`).

For each resolution (640x360 and 1280x720, 25 fps 8-bit 4:2:0 H.264 as cameras send it, made
once under target/compare/ with x264enc; without the I420 caps x264enc would pick 10-bit 4:4:4),
the same file is decoded to BGR by:

* `kvs-frames`: `demo_kvs_hls_reader --uri FILE --no-display` (release build): UriFrameSource,
  the default SIMD colour conversion and decoder threads;
* `kvs-frames-gst`: the same with `--color-conversion gstreamer` (`videoconvert`);
* `kvs-frames-libav`: the same with `--decoder-threads libav` (libav's frame threading, one
  thread per core; the default `Auto` gives pictures up to 1080p one thread);
* `ffmpeg`: `ffmpeg -i FILE -pix_fmt bgr24 -f rawvideo -y /dev/null` (libavcodec + swscale);
* `opencv`: a Python `cv2.VideoCapture(FILE)` read loop (opencv-python-headless in a venv under
  target/compare/venv, created on first use from PyPI).

Each case runs on a file of S seconds and one of 3S seconds (`--seconds S`, default 30); the
CPU per frame reported first is (CPU of the long run - CPU of the short run) / the frames between
them, which takes out every tool's start-up (plugin loading, `import cv2`) alike; the
whole-process figure of the long run follows it. CPU is user + system (the children's rusage).
The cases run in turns (A B C D E, A B C D E, ...) so that load changes hit them
alike, and the median of the runs is reported with the ratios to ffmpeg and OpenCV.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "compare"
DEMO = ROOT / "target" / "release" / "examples" / "demo_kvs_hls_reader"
VENV = WORK / "venv"
FPS = 25

OPENCV_LOOP = """
import sys, cv2
cap = cv2.VideoCapture(sys.argv[1])
n = 0
while True:
    ok, frame = cap.read()
    if not ok:
        break
    n += 1
print(n)
"""


def make_file(width, height, seconds):
    path = WORK / f"bars-{height}p-{seconds}s-i420.mp4"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    frames = seconds * FPS
    bitrate = 1000 if height <= 360 else 2500
    subprocess.run(
        [
            "gst-launch-1.0", "-q",
            "videotestsrc", f"num-buffers={frames}", "pattern=smpte", "horizontal-speed=3", "!",
            f"video/x-raw,format=I420,width={width},height={height},framerate={FPS}/1", "!",
            "timeoverlay", "font-desc=Sans 24", "!",
            "x264enc", "speed-preset=veryfast", "bframes=0", f"key-int-max={2 * FPS}",
            f"bitrate={bitrate}", "!",
            "h264parse", "!", "mp4mux", "!", "filesink", f"location={path}",
        ],
        check=True,
    )
    return path


def venv_python():
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "opencv-python-headless", "numpy"],
            check=True,
        )
    return python


def timed(argv):
    """(user + system CPU seconds, stdout, stderr) of argv and its children, waited for."""
    before = os.times()
    proc = subprocess.run(argv, capture_output=True, text=True)
    after = os.times()
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return cpu, proc.stdout, proc.stderr


def frames_of_demo(err):
    for line in err.splitlines():
        if line.startswith("final:"):
            return int(line.split()[1])
    sys.exit(f"no final line from the demo: {err[-2000:]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    for tool in ("gst-launch-1.0", "ffmpeg"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (Debian: gstreamer1.0-tools, ffmpeg)")
    if not DEMO.exists():
        subprocess.run(
            ["cargo", "build", "--release", "--example", "demo_kvs_hls_reader"],
            cwd=ROOT,
            check=True,
        )
    python = venv_python()
    short, long_ = args.seconds, 3 * args.seconds
    for width, height in ((640, 360), (1280, 720)):
        paths = {s: str(make_file(width, height, s)) for s in (short, long_)}

        def cases(path):
            demo = [str(DEMO), "--uri", path, "--no-display"]
            return {
                "kvs-frames": (demo, "demo"),
                "kvs-frames-gst": (demo + ["--color-conversion", "gstreamer"], "demo"),
                "kvs-frames-libav": (demo + ["--decoder-threads", "libav"], "demo"),
                "ffmpeg": (
                    ["ffmpeg", "-v", "error", "-i", path, "-pix_fmt", "bgr24", "-f",
                     "rawvideo", "-y", "/dev/null"],
                    "fixed",
                ),
                "opencv": ([str(python), "-c", OPENCV_LOOP, path], "stdout"),
            }

        names = list(cases(paths[short]))
        whole = {name: [] for name in names}
        marginal = {name: [] for name in names}
        for _ in range(args.runs):
            for name in names:
                cpu = {}
                for seconds, path in paths.items():
                    argv, count = cases(path)[name]
                    spent, out, err = timed(argv)
                    frames = seconds * FPS
                    n = {"demo": lambda: frames_of_demo(err),
                         "stdout": lambda: int(out.strip()),
                         "fixed": lambda: frames}[count]()
                    if n != frames:
                        sys.exit(f"{name} decoded {n} frames of {path}, expected {frames}")
                    cpu[seconds] = spent
                whole[name].append(cpu[long_] / (long_ * FPS) * 1000)
                marginal[name].append(
                    (cpu[long_] - cpu[short]) / ((long_ - short) * FPS) * 1000)
        for title, table in (
            (f"per frame, start-up excluded: (CPU of {long_} s - CPU of {short} s) / "
             f"{(long_ - short) * FPS} frames", marginal),
            (f"per frame of the whole {long_} s process, start-up included", whole),
        ):
            print(f"\n{width}x{height}, median of {args.runs} runs, CPU ms (user + system) {title}")
            median = {name: statistics.median(v) for name, v in table.items()}
            print(f"{'case':<18}{'ms/frame':>10}{'vs ffmpeg':>11}{'vs opencv':>11}   runs")
            for name, m in median.items():
                runs = " ".join(f"{v:.2f}" for v in table[name])
                print(f"{name:<18}{m:>10.3f}{m / median['ffmpeg']:>11.2f}"
                      f"{m / median['opencv']:>11.2f}   {runs}")

if __name__ == "__main__":
    main()
