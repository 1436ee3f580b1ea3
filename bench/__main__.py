"""`python -m bench`: every benchmark, each in its own process; prints the JSON of all of them and a
table. Never part of the tests' pass/fail.

    python -m bench [--quick] [--only overhead,throughput,coldload,switch,lifecycle] [--cache warm|cold] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import lifecycle
from bench.common import cleanup, machine, run_child, scratch, table

ALL = ("overhead", "throughput", "coldload", "switch", "lifecycle")


def rows(results: dict) -> list[list]:
    out = []
    if o := results.get("overhead"):
        for key, label in (("inpaint_64", "inpaint 64x64, 2 steps"), ("inpaint_512_base64", "inpaint 512x512 base64 input")):
            r = o[key]
            out.append([f"request overhead: {label}", f"p50 {r['overhead']['p50_ms']} ms / p95 {r['overhead']['p95_ms']} ms",
                        f"engine p50 {r['engine']['p50_ms']} ms, n={r['overhead']['n']}", o["server_peak_rss_mb"]])
    if t := results.get("throughput"):
        for name in ("fetch", "system_details"):
            r = t[name]
            out.append([f"throughput: {name} @ {t['concurrency']}", f"{r['rps']} req/s",
                        f"{r['requests']} requests, {r['errors']} errors", t["server_peak_rss_mb"]])
    if c := results.get("coldload"):
        for variant, r in c["variants"].items():
            if variant.startswith("floor"):
                out.append([f"cold load ({c['cache']} cache): {variant} (read {r['bytes'] / 1e9:.2f} GB)",
                            f"{r['load_s']} s", "", r["peak_rss_mb"]])
                continue
            ratio = f"; {r['load_vs_floor']}x / {r['cold_vs_floor']}x floor" if "load_vs_floor" in r else ""
            out.append([f"cold load ({c['cache']} cache): {variant} ({r['bytes'] / 1e9:.2f} GB, {r['run_dtype']})",
                        f"load {r['load_s']} s, cold {r['cold_s']} s",
                        f"import {r['import_s']} s, 1st image {r['first_image_s']} s, 2nd {r['second_image_s']} s, "
                        f"process {r['process_s']} s{ratio}", r["peak_rss_mb"]])
    if s := results.get("switch"):
        e = s["tiny_end_to_end"]
        out.append(["model switch A->B (tiny, cached), end to end", f"+{e['model_switch_extra_ms']} ms",
                    f"B after A {e['model_b_after_a_ms']} ms vs B after B {e['model_b_after_b_ms']} ms", s["peak_rss_mb"]])
        out.append(["text2img -> inpaint, one model, end to end", f"+{e['variant_switch_extra_ms']} ms",
                    f"{e['inpaint_after_text2img_ms']} ms vs {e['inpaint_after_inpaint_ms']} ms", s["peak_rss_mb"]])
        for key, label in (("tiny_mechanics", "tiny"), ("sd15_mechanics", "SD 1.5 size")):
            if m := s.get(key):
                for what in ("model_switch_ms", "variant_switch_ms"):
                    out.append([f"switch mechanics ({label}): {what.replace('_ms', '').replace('_', ' ')}",
                                f"{m['now'][what]} ms", f"before (from_pipe per job): {m['before'][what]} ms", s["peak_rss_mb"]])
    if lc := results.get("lifecycle"):
        out.extend(lifecycle.rows(lc))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer requests, repeats and seconds")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset of " + ", ".join(ALL))
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm", help="page cache for the cold loads")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    wanted = [name for name in args.only.split(",") if name]
    unknown = set(wanted) - set(ALL)
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    quick = ["--quick"] if args.quick else []
    results: dict = {"machine": machine(), "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    models = scratch("models") if "coldload" in wanted else None  # the SD 1.5-sized models, shared with switch
    try:
        for name in wanted:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            extra: list[str] = []
            if name == "coldload":
                extra = ["--cache", args.cache, "--keep", str(models)]
            if name == "switch" and models is not None:
                extra = ["--big", str(models / "store")]
            results[name] = run_child(f"bench.{name}", *quick, *extra, timeout=4 * 3600)
    finally:
        if models is not None:
            cleanup(models)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print()
    print(table(rows(results), ["measurement", "result", "detail", "peak RSS MB"]))


if __name__ == "__main__":
    main()
