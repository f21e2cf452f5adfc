"""Benchmark: pretokenize.py end to end vs the bare batched Llama-3 tokenizer on the same ~50 MB of JSONL text.

    python bench/bench_pretokenize.py [--mb 50] [--repeats 3] [--work-dir /tmp/bench_pretokenize] [--write-results]

Data: English-like plain documents, generated deterministically (seed 0): words drawn Zipf-like from ~300 common
English words, sentences of 4-24 words with capitals and punctuation, paragraphs, document lengths log-uniform
from 20 to 6000 words (a few exceed 8192 tokens, so --long split is exercised), each record
{"text": format_plain(text), "format": "plain"} as data_processing.py writes it. Plain English, not the sample
task's note tokens, because it tokenizes at a realistic ~4-5 characters per token.

Timed, both with the same threads (all cores):
  * bare:  tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False) over all texts already in memory
           (reading the file and taking .ids out of the encodings are not timed: the most favourable baseline);
  * ours:  `python pretokenize.py --input D --tokenizer T --output-dir O` as a subprocess, wall clock, i.e.
           interpreter start, tokenizer load and validation, JSON parsing, tokenization, packing, zstd parquet.
The best of --repeats runs is kept for each (this machine is shared; the minimum is the least disturbed run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora.llama3 import bundled_tokenizer_json, format_plain  # noqa: E402

WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this from or had
by not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now find
any new work part take get place made live where after back little only round man year came show every good me
give our under name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close night real
life few north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem piece told knew
pass since top whole king space heard best hour better true during hundred five remember step early hold west
ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct
able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among""".split()


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    p /= p.sum()
    n_docs = 0
    written = 0
    with open(path, "w") as f:
        while written < target_bytes:
            n_words = int(np.exp(rng.uniform(np.log(20), np.log(6000))))
            toks = words[rng.choice(len(words), size=n_words, p=p)]
            parts, i = [], 0
            while i < n_words:
                k = int(rng.integers(4, 25))
                sent = " ".join(toks[i:i + k])
                parts.append(sent[:1].upper() + sent[1:] + (". " if rng.random() < 0.8 else ", "))
                if rng.random() < 0.1:
                    parts.append("\n\n")
                i += k
            text = "".join(parts).strip()
            line = json.dumps({"text": format_plain(text), "format": "plain"}) + "\n"
            f.write(line)
            written += len(line)
            n_docs += 1
    return n_docs


def bench_bare(jsonl: Path, fast: bool) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(bundled_tokenizer_json())
    with open(jsonl) as f:
        texts = [json.loads(line)["text"] for line in f]
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    t, c = time.perf_counter(), time.process_time()
    encs = encode(texts, add_special_tokens=False)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    return dt, cpu, sum(len(e) for e in encs)


def bench_ours(data_dir: Path, out_dir: Path, extra: list[str]) -> tuple[float, dict, list[str]]:
    cmd = [sys.executable, str(ROOT / "pretokenize.py"), "--input", str(data_dir), "--tokenizer",
           bundled_tokenizer_json(), "--output-dir", str(out_dir)] + extra
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)  # the script and its worker processes
    return dt, cpu, json.loads((out_dir / "metadata.json").read_text()), cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="JSONL size in MB (default 50)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest is reported (default 3)")
    ap.add_argument("--work-dir", default="/tmp/bench_pretokenize", help="where data and output go")
    ap.add_argument("--write-results", action="store_true", help="replace our section of bench/RESULTS.md")
    ap.add_argument("pretokenize_args", nargs="*", help="extra flags for pretokenize.py (after --)")
    args = ap.parse_args()

    work = Path(args.work_dir)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    jsonl = data / "train.jsonl"
    stamp = data / f".generated-{args.mb}"
    if not stamp.exists():
        n = generate(jsonl, int(args.mb * 1e6))
        stamp.write_text(str(n))
    size = jsonl.stat().st_size
    print(f"data: {jsonl} {size / 1e6:.1f} MB, {stamp.read_text()} documents")

    bare, bare_fast, ours = [], [], []   # (wall, cpu) seconds
    loads = []
    for r in range(args.repeats):  # interleaved, so a noisy neighbour hurts both sides alike
        *t, n_bare = bench_bare(jsonl, fast=False)
        bare.append(t)
        *t, _ = bench_bare(jsonl, fast=True)
        bare_fast.append(t)
        *t, meta, cmd = bench_ours(data, work / "out", args.pretokenize_args)
        ours.append(t)
        loads.append(os.getloadavg()[0])
        print(f"run {r} (wall s, cpu s): bare encode_batch {bare[-1][0]:.2f} {bare[-1][1]:.2f}, "
              f"encode_batch_fast {bare_fast[-1][0]:.2f} {bare_fast[-1][1]:.2f}, "
              f"pretokenize.py {ours[-1][0]:.2f} {ours[-1][1]:.2f}  (load average {os.getloadavg()[0]:.1f})",
              flush=True)
    tr = meta["splits"]["train"]
    n_in = tr["input_tokens"]
    (b, bc), (bf, bfc), (o, oc) = (min(x) for x in (bare, bare_fast, ours))
    bc, bfc, oc = (min(c for _, c in x) for x in (bare, bare_fast, ours))
    lines = [
        f"- device: this CPU machine ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"{datetime.date.today().isoformat()}",
        f"- data: {size / 1e6:.1f} MB JSONL, {tr['documents'] + tr['long_dropped']} plain English-like documents "
        f"(bench/bench_pretokenize.py, seed 0), {n_in:,} tokens (bare count {n_bare:,})",
        f"- command: `python bench/bench_pretokenize.py --mb {args.mb:g} --repeats {args.repeats}"
        f"{' -- ' + ' '.join(args.pretokenize_args) if args.pretokenize_args else ''}` (best of {args.repeats}, "
        "interleaved)",
        f"- load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores (the machine is "
        "shared; wall times grow with the load, the ratios are the comparable numbers)",
        "",
        "| what | wall s | tokens/s | wall vs bare | CPU s | CPU vs bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| bare `encode_batch` (in memory, {os.cpu_count()} threads) | {b:.2f} | {n_bare / b:,.0f} | 1.00 | {bc:.2f} | 1.00 |",
        f"| bare `encode_batch_fast` (no offsets) | {bf:.2f} | {n_bare / bf:,.0f} | {bf / b:.2f} | {bfc:.2f} | {bfc / bc:.2f} |",
        f"| `pretokenize.py` end to end (`--num-proc {os.cpu_count()}`) | {o:.2f} | {n_in / o:,.0f} | **{o / b:.2f}** | "
        f"{oc:.2f} | {oc / bc:.2f} |",
        "",
        f"Output: {tr['rows']} rows of {meta['max_len']}, fill rate {tr['fill_rate']:.2%}, "
        f"{tr['long_split']} long documents split, {len(tr['shards'])} shards.",
    ]
    print("\n".join(lines))
    if args.write_results:
        write_section(ROOT / "bench" / "RESULTS.md", "## pretokenize.py (CPU)", "\n".join(lines))


def write_section(path: Path, heading: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{heading}\n\n{body}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
