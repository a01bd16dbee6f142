"""Rich tables the `edge-tl` command line prints: metrics, verification, cross-validation (and its grid), predictions."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from edge_tl.gate import bounds_text

PREDICTIONS_SHOWN = 20  # rows of `edge-tl predict` printed; --out has them all


def metrics_table(metrics: dict, title: str) -> Table:
    """A table of the headline metrics and per-class precision/recall."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column("precision", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("support", justify="right")
    for name, row in metrics["per_class"].items():
        marker = " (ok)" if name == metrics.get("ok_class") else ""
        table.add_row(name + marker, f"{row['precision']:.3f}", f"{row['recall']:.3f}", str(row["support"]))
    table.add_section()
    table.add_row("accuracy", "", f"{metrics['accuracy']:.4f}", str(metrics.get("num_samples", "")))
    table.add_row("balanced accuracy", "", f"{metrics['balanced_accuracy']:.4f}", "")
    if "escape_rate" in metrics:
        table.add_row("escape rate", "", f"{metrics['escape_rate']:.4f}", "")
        table.add_row("false reject rate", "", f"{metrics['false_reject_rate']:.4f}", "")
    return table


def verification_table(rows: list[dict]) -> Table:
    """One row per verified artifact: agreement with its float model and the gate's verdict."""
    table = Table(title="verification against the float model of each stage")
    for column in ("artifact", "top-1 agreement", "max |diff|", "balanced acc.", "delta (pt)", "escape delta (pt)",
                   "upper bounds", "verdict"):
        table.add_column(column, justify="left" if column in ("artifact", "upper bounds") else "right",
                         no_wrap=column == "artifact")
    for row in rows:
        verdict = row.get("verdict") or ("PASS" if row["passed"] else "FAIL")
        table.add_row(Path(row["artifact"]).name, f"{row['top1_agreement']:.3f}", f"{row['max_abs_diff']:.2e}",
                      f"{row['balanced_accuracy']:.4f}", f"{row['balanced_accuracy_delta']:+.2f}",
                      f"{row.get('escape_rate_delta', 0.0):+.2f}", bounds_text(row), verdict)
    return table


def cross_validation_tables(result: dict, title: str) -> list[Table]:
    """Pooled out-of-fold metrics, each fold's with mean and spread, and the escape budgets' costs."""
    tables = [metrics_table(result["pooled"], title)]
    table = Table(title="per fold")
    table.add_column("metric")
    for row in result["per_fold"]:
        table.add_column(f"fold {row['fold']}", justify="right")
    table.add_column("mean +- std", justify="right")
    for key, mean in result["mean"].items():
        table.add_row(key, *[f"{row[key]:.4f}" for row in result["per_fold"]], f"{mean:.4f} +- {result['std'][key]:.4f}")
    tables.append(table)
    if result.get("operating_points"):
        points = Table(title="escape budget (finetune --max-escape): out-of-fold cost, the shift chosen on these logits")
        for column in ("max escape", "ok-logit shift", "escape rate", "false reject rate", "balanced acc."):
            points.add_column(column, justify="right")
        for point in result["operating_points"]:
            points.add_row(f"{point['max_escape']:.2f}", f"{point['ok_logit_shift']:.3f}", f"{point['escape_rate']:.4f}",
                           f"{point['false_reject_rate']:.4f}", f"{point['balanced_accuracy']:.4f}")
        tables.append(points)
    if result.get("escape_budget"):
        budget = result["escape_budget"]
        chosen = Table(title=f"the recipe's escape budget {budget['max_escape']:g}: each fold's shift, chosen out of fold "
                             "on its training images")
        for column in ("fold", "ok-logit shift", "escape rate there", "false reject rate there"):
            chosen.add_column(column, justify="right")
        for point in budget["per_fold"]:
            chosen.add_row(str(point["fold"]), f"{point['ok_logit_shift']:.3f}", f"{point['escape_rate']:.4f}",
                           f"{point['false_reject_rate']:.4f}")
        tables.append(chosen)
    return tables


def grid_table(grid: dict, title: str) -> Table:
    """One row per cross-validated recipe: balanced accuracy, escapes, false rejects, escape-budget costs, time."""
    rows = grid["rows"]
    budgets = list(rows[0].get("false_reject_rate_at_escape", {}))
    table = Table(title=title)
    has_budget = any(row.get("max_escape") is not None for row in rows)  # a column only when a recipe has one
    columns = ["recipe", "unfreeze", "l2sp", "size", *(["max escape"] if has_budget else []), "balanced acc.",
               "folds mean +- std"]
    if "escapes" in rows[0]:
        columns += ["escapes", "false rejects", *[f"FRR @ escape <= {budget}" for budget in budgets]]
    for column in [*columns, "wall s"]:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in rows:
        marker = " (best)" if row["name"] == grid["best"] else ""
        cells = [row["name"] + marker, str(row["unfreeze"]), f"{row['l2sp']:g}" if row["unfreeze"] else "-",
                 str(row["img_size"]),
                 *([] if not has_budget else ["-" if row.get("max_escape") is None else f"{row['max_escape']:g}"]),
                 f"{row['balanced_accuracy']:.4f}",
                 f"{row['balanced_accuracy_fold_mean']:.4f} +- {row['balanced_accuracy_fold_std']:.4f}"]
        if "escapes" in row:
            cells += [f"{row['escapes']} / {row['defects']}", f"{row['false_rejects']} / {row['goods']}",
                      *[f"{row['false_reject_rate_at_escape'][budget]:.4f}" for budget in budgets]]
        table.add_row(*cells, f"{row['seconds_total']:.0f}")
    return table


def grid_summary(grid: dict) -> str:
    """The best recipe, and whether its gain over the first is larger than the first's fold-to-fold spread."""
    gain, spread = grid["gain_over_first"], grid["first_fold_std"]
    first = grid["rows"][0]["name"]
    verdict = ("larger than" if gain > spread else "within") + f" {first}'s fold-to-fold spread ({spread:.4f})"
    if grid["best"] == first:
        return f"best: {first} (the first recipe); the grid took {grid['seconds_total']:.0f} s"
    return (f"best: {grid['best']}, {gain:+.4f} balanced accuracy over {first}, {verdict}; "
            f"the grid took {grid['seconds_total']:.0f} s")


def predictions_table(result, title: str) -> Table:
    """The first PREDICTIONS_SHOWN predictions: file, class, probability."""
    table = Table(title=title)
    for column in ("file", "predicted", "probability"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    for row in result.rows[:PREDICTIONS_SHOWN]:
        table.add_row(row["file"], row["predicted"], f"{row['probability']:.3f}")
    return table


def sweep_table(record: dict) -> Table:
    """One row per sweep trial: status, recommended artifact, latency, balanced accuracy, escape rate, verdict."""
    table = Table(title=f"edge-tl sweep ({record['scheduler']}, {record['workers']} at a time)")
    for column in ("trial", "status", "recommended", "p50 ms", "bal. acc.", "escape", "verdict", "seconds"):
        table.add_column(column, justify="left" if column in ("trial", "status", "recommended", "verdict") else "right")

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in record["rows"]:
        if row["status"] == "failed":
            table.add_row(row["name"], "failed", row["error"], "", "", "", "", "")
            continue
        table.add_row(row["name"] + (" *" if row["name"] == record.get("best") else ""), row["status"],
                      row.get("artifact") or f"none ({row.get('verdicts')})", number(row.get("latency_ms_p50"), ".3f"),
                      number(row.get("balanced_accuracy"), ".4f"), number(row.get("escape_rate"), ".4f"),
                      row.get("verdict") or "-", number(row.get("seconds"), ".1f"))
    budget = record.get("max_latency_ms")
    table.caption = (f"* best within {budget:g} ms" if budget else "* best") + f": {record.get('best') or 'none'}"
    return table
