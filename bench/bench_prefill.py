"""Peak memory of prefilling a 16K-token prompt, one shot vs in chunks (each point a fresh process).

    python bench/bench_prefill.py [--tokens 16384] [--layers 4]

Model: the smollm2-135m preset shape (dim 576, 9 heads, 3 kv heads, vocab 49152) with --layers layers and
random weights, float32, on CPU. Prints peak RSS growth during `prefill` for each chunk size.
"""
import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from checkpoint import load_model
from generate import prefill

def kib(field):  # VmHWM: peak resident set; VmRSS: current
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))

net = load_model('smollm2-135m', n_layers={layers}).eval()
x = torch.randint(0, 49152, ({tokens},))
net.setup_caches(1, {tokens})
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS (Linux >= 4.0)
before = kib('VmRSS')
t = time.perf_counter()
prefill(net, x, chunk={chunk})
print((kib('VmHWM') - before) / 1024, time.perf_counter() - t)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--chunks", default="1024,4096,0", help="0 = one shot")
    args = ap.parse_args()
    print(f"| chunk | peak RSS growth (MiB) | seconds |  ({args.tokens} tokens, {args.layers} layers)")
    print("| --- | --- | --- |")
    for c in (int(s) for s in args.chunks.split(",")):
        code = CHILD.format(root=str(ROOT), layers=args.layers, tokens=args.tokens, chunk=c or None)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        mib, sec = map(float, r.stdout.split())
        print(f"| {c or 'one shot'} | {mib:.0f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
