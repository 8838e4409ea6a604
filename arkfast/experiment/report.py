"""``experiment.json`` and ``experiment.md`` from the finished-stage markers of an experiment folder.

Rewritten (atomically) whenever a stage or a student finishes, so the table fills in as the run goes;
a row whose seeds are not all done yet says how many it has.

Intervals (all 95%, :mod:`.stats`):

* a baseline (one generate run per evaluation seed): Wilson's interval on all its answers pooled;
* a student: mean ± std over training seeds (each seed's accuracy the mean of its evaluations), the t
  interval over seeds, and the normal interval over problems of each problem's accuracy averaged over
  every seed and evaluation (test-set sampling noise, which the seed interval leaves out);
* method vs its matched control: the paired difference by training seed (t interval) and by problem
  (normal interval). A method *beats* its control when the seed interval's lower end is above zero.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from arkfast.generate import write_json_atomic

from .config import ABLATIONS, CONTROLS, EXTRA_COMPARISONS, SPAN_WEIGHTS, ExperimentConfig
from .stats import mean_std, normal_interval, paired_interval, t_interval, wilson_interval

__all__ = ["machine", "write_report"]

TIME_TARGET_S = 30 * 60
LABELS = {"base": "base model alone", "self-consistency": "self-consistency@{sc}", "debate": "debate {a}x{r} (committee)",
          "rft-tokens": "RFT, R-SFT's training tokens", "rft-compute": "RFT, DA's generation compute",
          "rsft": "R-SFT", "da": "DA", "pad": "PAD", "pad-online": "PAD (online)",
          "graph": "graph-supervised (MAGDi-style)", "graph-nt": "graph rows, terms off (next-token only)",
          "correct": "R-SFT + self-correction, one pass", "correct-refine": "R-SFT + self-correction, self-refine",
          "rsft-span": "R-SFT, span-weighted ({span})", "self-refine": "base model + self-refine"}


def machine() -> str:
    """The CPU model, its core count, and the accelerator (or "CPU only")."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only, no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def commit() -> str:
    """``git`` HEAD of the package's checkout, with ``+uncommitted`` when the tree differs from it."""
    here = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" +uncommitted changes" if dirty else "")


def _markers(root: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "stages").glob("*.json"))}


def _per_problem(evals: list[dict[str, Any]]) -> dict[str, float]:
    ids = set.intersection(*(set(e["per_problem"]) for e in evals))
    return {i: sum(e["per_problem"][i] for e in evals) / len(evals) for i in sorted(ids)}


def _baseline_row(system: str, markers: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [m["result"] for m in markers]
    correct, n = sum(e["correct"] for e in evals), sum(e["problems"] for e in evals)
    return {"system": system, "kind": "baseline", "evaluations": len(evals),
            "accuracy": correct / n, "accuracy_std": None, "interval": wilson_interval(correct, n),
            "interval_kind": "Wilson, answers pooled", "per_seed": [e["accuracy"] for e in evals],
            "calls_per_problem": sum(e["calls"] for e in evals) / n,
            "tokens_per_problem": sum(e["completion_tokens"] for e in evals) / n,
            "prompt_tokens_per_problem": sum(e["prompt_tokens"] for e in evals) / n,
            "generation_tokens": None, "training_tokens": None,
            "wall_seconds": sum(m["seconds"] for m in markers) / len(markers), "_per_problem": _per_problem(evals)}


def _student_row(system: str, markers: list[dict[str, Any]], generation_tokens: int | None) -> dict[str, Any]:
    per_seed, evals, walls = [], [], []
    for m in markers:
        seed_evals = list(m["result"]["evals"].values())
        per_seed.append(sum(e["accuracy"] for e in seed_evals) / len(seed_evals))
        evals += seed_evals
        walls.append(m["result"]["train"]["wall_seconds"] + sum(e["seconds"] for e in seed_evals))
    mean, std = mean_std(per_seed)
    problems = _per_problem(evals)
    n = sum(e["problems"] for e in evals)
    trains = [m["result"]["train"] for m in markers]
    return {"system": system, "kind": "student", "seeds": [m["result"]["seed"] for m in markers],
            "evaluations": len(evals), "accuracy": mean, "accuracy_std": std, "per_seed": per_seed,
            "interval": _clip(t_interval(per_seed), 0.0) if len(per_seed) > 1 else None,
            "interval_kind": "t over training seeds",
            "interval_problems": _clip(normal_interval(list(problems.values())), 0.0) if len(problems) > 1 else None,
            "calls_per_problem": sum(e["calls"] for e in evals) / n,
            "tokens_per_problem": sum(e["completion_tokens"] for e in evals) / n,
            "prompt_tokens_per_problem": sum(e["prompt_tokens"] for e in evals) / n,
            "generation_tokens": generation_tokens,
            "training_tokens": sum(t["train_tokens"] for t in trains) / len(trains),
            "training_examples": sum(t["examples"] for t in trains) / len(trains),
            "final_loss": [t["final_loss"] for t in trains],
            "wall_seconds": sum(walls) / len(walls), "_per_problem": problems}


def _clip(interval: tuple[float, float], low: float) -> tuple[float, float]:
    """A normal-approximation interval cut to the possible values (``[low, 1]``)."""
    return max(low, interval[0]), min(1.0, interval[1])


def _comparison(method: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    seeds = sorted(set(method["seeds"]) & set(control["seeds"]))
    a = [method["per_seed"][method["seeds"].index(s)] for s in seeds]
    b = [control["per_seed"][control["seeds"].index(s)] for s in seeds]
    by_seed = paired_interval(a, b)
    if by_seed["interval"] is not None:
        by_seed["interval"] = _clip(by_seed["interval"], -1.0)
    ids = sorted(set(method["_per_problem"]) & set(control["_per_problem"]))
    diffs = [method["_per_problem"][i] - control["_per_problem"][i] for i in ids]
    by_problem = _clip(normal_interval(diffs), -1.0) if len(diffs) > 1 else None
    lo = by_seed["interval"][0] if by_seed["interval"] else None
    return {"method": method["system"], "control": control["system"], "seeds": seeds,
            "difference": by_seed["mean"], "interval_seeds": by_seed["interval"], "interval_problems": by_problem,
            "beats": lo is not None and lo > 0}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _interval(iv) -> str:
    return "—" if iv is None else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _invocations(root: Path, running_seconds: float) -> tuple[float, list[str]]:
    """``(seconds, commits)`` of the invocations in ``stages.jsonl`` that ran a stage (a rerun that only
    reused finished stages is not experiment time); ``running_seconds``: the current invocation's time so
    far, when it is not yet logged as ended."""
    path, total, commits, current = root / "stages.jsonl", 0.0, [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["stage"] == "experiment" and event["event"] == "start":
                current = {"ran": False, "commit": event.get("commit")}
            elif event["stage"] == "experiment" and event["event"] == "end":
                if current is not None and current["ran"]:
                    total += event["seconds"]
                    if current["commit"] and current["commit"] not in commits:
                        commits.append(current["commit"])
                current = None
            elif event["event"] == "ran" and current is not None:
                current["ran"] = True
    if current is not None and current["ran"]:
        total += running_seconds
        if current["commit"] and current["commit"] not in commits:
            commits.append(current["commit"])
    return total, commits


def _targets(rows: dict[str, dict[str, Any]], comparisons: list[dict[str, Any]], total_s: float,
             cfg: ExperimentConfig) -> list[str]:
    lines = []
    students = [r for r in rows.values() if r["system"] in CONTROLS]  # the students of the debates
    committee = rows.get("debate")
    if students and committee:
        best = max(students, key=lambda r: r["accuracy"])
        met = best["accuracy"] >= committee["accuracy"]
        lines.append(f"Target 1 {'met' if met else 'missed'}: the best student of the debates, {best['label']}, scores "
                     f"{_pct(best['accuracy'])}% against the committee's {_pct(committee['accuracy'])}% "
                     f"({'+' if met else ''}{100 * (best['accuracy'] - committee['accuracy']):.1f} points).")
    for c in comparisons:
        if (c["method"], c["control"]) in EXTRA_COMPARISONS:
            continue
        name, control = rows[c["method"]]["label"], rows[c["control"]]["label"]
        d, iv = 100 * c["difference"], c["interval_seeds"]
        if iv is None:
            lines.append(f"Target 2, {name}: not decided, one seed only ({d:+.1f} points vs {control}).")
        elif iv[1] < 0:
            lines.append(f"Target 2, {name}: missed; it is worse than {control}: {d:+.1f} points, 95% interval "
                         f"over seeds {_interval(iv)}, wholly below zero.")
        elif c["beats"]:
            lines.append(f"Target 2, {name}: met; it beats {control} by {d:+.1f} points, 95% interval over seeds "
                         f"{_interval(iv)} (lower end above zero).")
        else:
            lines.append(f"Target 2, {name}: missed; {name} minus {control} is {d:+.1f} points, 95% interval "
                         f"over seeds {_interval(iv)}, whose lower end is {-100 * iv[0]:.1f} points short of zero: "
                         f"here the debate data adds nothing over the model's own samples that these seeds can "
                         f"tell apart.")
    online = [c for c in comparisons if c["method"] == "pad-online" and c["control"] in ("pad", "rft-compute")]
    if online:
        beaten = [c for c in online if c["beats"]]
        parts = "; ".join(f"{100 * c['difference']:+.1f} points vs {LABELS[c['control']]} (95% interval over seeds "
                          f"{_interval(c['interval_seeds'])})" for c in online)
        lines.append(f"Target PAD (online) {'met' if len(beaten) == 2 else 'missed'}: {parts}; it must beat offline "
                     f"PAD and the compute-matched RFT (lower ends above zero).")
    lines.append(f"Target 3 {'met' if total_s <= TIME_TARGET_S else 'missed'}: the stages run by this "
                 f"experiment took {_seconds(total_s)} of wall time in all (target 30 min on 2 cores).")
    return lines


def _self_correction(root: Path, markers: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]]) -> list[dict]:
    """Draft -> revised accuracy on the test split: the committee (round-1 majority -> round-2 majority
    of the debate), the base model and the self-correction student under self-refine (the draft is the
    agent's round-1 answer, the revision its round-2 one; a student is averaged over its seeds and
    evaluations)."""
    out = []
    summary = root / "test" / "debate" / "summary.json"
    if "test-debate" in markers and summary.is_file():
        by_round = json.loads(summary.read_text())["majority_accuracy_by_round"]
        if len(by_round) >= 2:
            out.append({"system": "debate", "draft": by_round[0], "revised": by_round[-1], "calls": rows["debate"]
                        ["calls_per_problem"] if "debate" in rows else None})
    if "test-self-refine" in markers:
        r = markers["test-self-refine"]["result"]
        out.append({"system": "self-refine", "draft": r["first_agent_correct"] / r["problems"],
                    "revised": r["correct"] / r["problems"], "calls": r["calls"] / r["problems"]})
    for name, row in rows.items():
        if row["kind"] != "student" or not name.endswith("-refine"):
            continue
        system = name.removesuffix("-refine")
        evals = [e for k in row["seeds"] for e in markers[f"student-{system}-seed{k}"]["result"]["refine_evals"].values()]
        n = sum(e["problems"] for e in evals)
        out.append({"system": name, "draft": sum(e["first_agent_correct"] for e in evals) / n,
                    "revised": sum(e["correct"] for e in evals) / n, "calls": sum(e["calls"] for e in evals) / n})
    return out


def write_report(root: Path, cfg: ExperimentConfig, model: str, argv: list[str], missing: dict[str, str], *,
                 invocation_seconds: float) -> dict[str, Any]:
    """Build the rows from the markers under ``root`` and write ``experiment.json`` and ``experiment.md``.
    ``invocation_seconds``: the time of the current invocation not yet logged as ended in ``stages.jsonl``."""
    markers = _markers(root)
    rows: dict[str, dict[str, Any]] = {}
    base = [markers[f"test-base-s{s}"] for s in range(cfg.eval_seeds) if f"test-base-s{s}" in markers]
    if base:
        rows["base"] = _baseline_row("base", base)
    for system, name in (("self-consistency", "test-self-consistency"), ("debate", "test-debate"),
                         ("self-refine", "test-self-refine")):
        if name in markers:
            rows[system] = _baseline_row(system, [markers[name]])
    debate_tokens = markers["train-debates"]["result"]["completion_tokens"] if "train-debates" in markers else None
    rft_tokens = markers["rft-samples"]["result"]["completion_tokens"] if "rft-samples" in markers else None
    label_tokens = (markers["prm-label"]["result"].get("this_run", {}).get("generated_tokens", 0)
                    if "prm-label" in markers else 0)
    generation = {"rsft": debate_tokens, "da": debate_tokens, "rft-tokens": rft_tokens, "rft-compute": rft_tokens,
                  "pad": None if debate_tokens is None else debate_tokens + label_tokens,
                  "graph": debate_tokens, "graph-nt": debate_tokens, "correct": debate_tokens, "correct-refine": debate_tokens,
                  "rsft-span": debate_tokens}
    for system in ("rft-tokens", "rft-compute", "rsft", "da", "pad", "pad-online", "graph", "graph-nt", "correct",
                   "rsft-span"):
        done = [markers[f"student-{system}-seed{k}"] for k in range(cfg.seeds) if f"student-{system}-seed{k}" in markers]
        if done and system == "pad-online" and generation["pad"] is not None:
            # DA's debates and the PRM's labelling rollouts, plus its own RL rollouts (mean over seeds)
            rollouts = [m["result"]["train"].get("rollout_tokens") or 0 for m in done]
            generation["pad-online"] = generation["pad"] + sum(rollouts) / len(rollouts)
        if done and system in cfg.systems:
            rows[system] = _student_row(system, done, generation.get(system))
        refined = [{**m, "result": {**m["result"], "evals": m["result"]["refine_evals"]}} for m in done
                   if m["result"].get("refine_evals")]
        if refined and system in cfg.systems:  # the same students, drafting then revising (self-refine)
            rows[f"{system}-refine"] = _student_row(f"{system}-refine", refined, generation[f"{system}-refine"])
    comparisons = [_comparison(rows[m], rows[c]) for m, c in (*CONTROLS.items(), *EXTRA_COMPARISONS)
                   if m in rows and c in rows]
    ablations = [_comparison(rows[m], rows[c]) for m, c in ABLATIONS if m in rows and c in rows]
    for r in rows.values():
        r["label"] = LABELS[r["system"]].format(sc=cfg.sc_agents, a=cfg.agents, r=cfg.rounds, span=SPAN_WEIGHTS)

    stage_rows = [{"stage": name, "seconds": m["seconds"], "finished_at": m["finished_at"]}
                  for name, m in sorted(markers.items(), key=lambda kv: kv[1]["finished_at"])]
    total_s, commits = _invocations(root, invocation_seconds)
    result = {
        "machine": machine(),
        "commit": (", ".join(commits) + " (the code that ran the stages)") if commits else f"not recorded by the invocations that ran the stages; HEAD now {commit()}",
        "command": " ".join(["python -m arkfast.experiment", *argv]).strip(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model,
        "config": {**cfg.data_settings(model), "seeds": cfg.seeds, "eval_seeds": cfg.eval_seeds,
                   "systems": list(cfg.systems), "jobs": cfg.jobs, "threads_per_job": cfg.threads_per_job()},
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows.values()],
        "comparisons": comparisons, "ablations": ablations, "self_correction": _self_correction(root, markers, rows),
        "graphs": markers.get("graphs", {}).get("result"),
        "stages": stage_rows, "wall_seconds": total_s, "missing": missing,
        "reused_train_debates": markers.get("train-debates", {}).get("result", {}).get("reused_records"),
        "load_average": os.getloadavg(),
    }
    result["targets"] = _targets(rows, comparisons, total_s, cfg)
    write_json_atomic(root / "experiment.json", result)
    md = root / "experiment.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(format_markdown(result, cfg))
    os.replace(tmp, md)
    return result


def format_markdown(result: dict[str, Any], cfg: ExperimentConfig) -> str:
    """The report for people: the table, the paired differences, the targets, the stage times."""
    c = result["config"]
    names = {k: v.format(sc=cfg.sc_agents, a=cfg.agents, r=cfg.rounds, span=SPAN_WEIGHTS) for k, v in LABELS.items()}
    out = ["# Experiment: one student vs the committee on `arith`", "",
           f"- command: `{result['command']}`", f"- machine: {result['machine']}",
           f"- commit: {result['commit']}; written {result['written_at']}",
           (f"- data: {c['train_problems']} train problems (debates {cfg.agents}x{cfg.rounds} at T={cfg.temperature}); "
           f"{c['test_problems']} test problems; students trained {c['epochs']} epochs at lr {c['lr']}, rows of "
           f"{c['row_tokens']} tokens, {c['seeds']} training seeds, each evaluated alone with "
           f"{c['eval_seeds']} sampling seed(s) at T={cfg.temperature}"), "",
           ("| system | calls / problem | tokens / problem (generated; prompt) | accuracy % | 95% interval | "
           "seeds × evals | generation tokens for training data | training tokens | wall time |"),
           "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "student":
            acc = f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])}"
            iv = f"{_interval(r['interval'])} seeds; {_interval(r['interval_problems'])} problems"
            runs = f"{len(r['seeds'])} × {r['evaluations'] // max(len(r['seeds']), 1)}"
        else:
            acc, iv, runs = _pct(r["accuracy"]), _interval(r["interval"]), f"— × {r['evaluations']}"
        out.append(f"| {r['label']} | {r['calls_per_problem']:.0f} | {r['tokens_per_problem']:.1f}; "
                   f"{r['prompt_tokens_per_problem']:.1f} | {acc} | {iv} | {runs} | {_num(r['generation_tokens'])} | "
                   f"{_num(r['training_tokens'])} | {_seconds(r['wall_seconds'])} |")
    if result["comparisons"]:
        out += ["", "Paired differences (method − matched control, accuracy points):", "",
                "| method | control | seeds | difference | 95% interval (seeds) | 95% interval (problems) | beats control |",
                "|---|---|---|---|---|---|---|"]
        for cmp in result["comparisons"]:
            out.append(f"| {names[cmp['method']]} | {names[cmp['control']]} | {len(cmp['seeds'])} | "
                       f"{100 * cmp['difference']:+.1f} | {_interval(cmp['interval_seeds'])} | "
                       f"{_interval(cmp['interval_problems'])} | {'yes' if cmp['beats'] else 'no'} |")
    if result.get("ablations"):
        out += ["", "Paired differences isolating one change (method − reference, accuracy points):", "",
                "| method | reference | seeds | difference | 95% interval (seeds) | 95% interval (problems) |",
                "|---|---|---|---|---|---|"]
        for cmp in result["ablations"]:
            out.append(f"| {names[cmp['method']]} | {names[cmp['control']]} | {len(cmp['seeds'])} | "
                       f"{100 * cmp['difference']:+.1f} | {_interval(cmp['interval_seeds'])} | "
                       f"{_interval(cmp['interval_problems'])} |")
    if result.get("self_correction"):
        out += ["", "Draft -> revised on the test split (the committee: round-1 majority -> round-2 majority):", "",
                "| system | calls / problem | draft % | revised % | gain (points) |", "|---|---|---|---|---|"]
        for r in result["self_correction"]:
            calls = "—" if r["calls"] is None else f"{r['calls']:.0f}"
            out.append(f"| {names.get(r['system'], r['system'])} | {calls} | {_pct(r['draft'])} | {_pct(r['revised'])} | "
                       f"{100 * (r['revised'] - r['draft']):+.1f} |")
    graphs = result.get("graphs")
    if graphs:
        from arkfast.trajectories.graphs import format_graph_stats

        kinds = graphs["correct"]
        out += ["", ("The train debates as interaction graphs (`trajectories/graphs.jsonl`; self-correction records "
                     f"`correct.jsonl`: {kinds['corrects']:,} corrects, {kinds['continues']:,} continues):"), "", "```",
                format_graph_stats(graphs["graphs"]), "```"]
    out += ["", *[f"- {line}" for line in result["targets"]]]
    if result["missing"]:
        out += ["", "Missing or incomplete rows:", "", *[f"- {names.get(k, k)}: {v}" for k, v in result["missing"].items()]]
    out += ["", "Notes:", "",
            ("- Accuracy: a baseline pools its evaluation runs (Wilson interval); a student is mean ± std over training "
            "seeds, with the t interval over seeds and the normal interval over test problems."),
            ("- Generation tokens: tokens sampled to make the training data (the train-split debates for R-SFT and DA; "
            "plus the PRM's Monte-Carlo rollouts for PAD; the single-agent samples for both RFT rows, the "
            "token-matched one drawing only part of them). Training tokens: tokens in the packed rows the trainer read."),
            ("- Wall time: a baseline's generation run; a student's training plus its evaluations (per seed, mean). "
            "Jobs ran " f"{c['jobs']} at a time with {c['threads_per_job']} thread(s) each on a machine shared with "
            f"other work (load average at writing: {', '.join(f'{x:.1f}' for x in result['load_average'])})."),
            "", "| stage | wall time | finished (UTC) |", "|---|---|---|"]
    for s in result["stages"]:
        out.append(f"| {s['stage']} | {_seconds(s['seconds'])} | {s['finished_at']} |")
    reused = result.get("reused_train_debates")
    if reused:
        out.append(f"\n{reused} of the train debates were copied from an earlier run of the same settings; their "
                   f"generation time is not in the train-debates stage.")
    out.append(f"\nTotal wall time of this experiment's invocations that ran stages: "
               f"{_seconds(result['wall_seconds'])}.")
    return "\n".join(out) + "\n"
