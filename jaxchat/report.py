"""The report card: each pipeline stage logs a markdown section; `generate` stitches them into report.md.

As nanochat's `nanochat/report.py`: sections live as files in `$JAXCHAT_BASE_DIR/report/`; `reset` starts a new report
with a header (system, git, devices, code size); `generate` writes `report.md` with every section present, a summary
table (CORE for base; ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE for SFT and RL) and the
wall-clock time and training cost of the run.

    python -m jaxchat.report reset
    python -m jaxchat.report generate
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import socket
import subprocess

from jaxchat.common import get_base_dir, is_main_process, run_cli

# Sections in pipeline order: the stage that writes each one calls get_report().log(section=<title>, data=[...]).
SECTIONS = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
]
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
# Rough on-demand price of one GPU-hour, for the cost line (USD); unknown devices are not priced.
GPU_HOUR_USD = {"h100": 3.00, "h200": 3.50, "a100": 1.80, "b200": 5.00}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _code_size(root: str) -> dict:
    """Lines and characters of the project's Python, HTML and shell files (nanochat's "bloat" numbers)."""
    files = lines = chars = 0
    for folder in ("jaxchat", "train", "evals", "serve", "runs", "tests"):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for name in names:
                if name.endswith((".py", ".html", ".sh")):
                    with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    files, lines, chars = files + 1, lines + text.count("\n"), chars + len(text)
    return {"files": files, "lines": lines, "characters": chars}


def header_markdown() -> str:
    """System, git and device information for the top of the report."""
    import jax

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = "yes" if _run(["git", "-C", root, "status", "--porcelain"]) else "no"
    devices = jax.devices()
    size = _code_size(root)
    return "\n".join([
        "# jaxchat training report",
        "",
        f"Generated: {datetime.datetime.now().strftime(TIME_FORMAT)}",
        "",
        "## Environment",
        "",
        f"- Host: {socket.gethostname()} ({platform.platform()})",
        f"- Python: {platform.python_version()}, jax {jax.__version__}",
        f"- CPUs: {os.cpu_count()}",
        f"- Devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), processes: {jax.process_count()}",
        f"- Git commit: {commit} (uncommitted changes: {dirty})",
        "",
        "### Bloat",
        f"- Files: {size['files']}",
        f"- Lines: {size['lines']:,}",
        f"- Characters: {size['characters']:,}",
        "",
        "",
    ])


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10000:
        return f"{value:,}"
    return str(value)


def _extract(section: str, keys: list[str]) -> dict[str, str]:
    """Values of `- key: value` lines for the given keys."""
    out = {}
    for line in section.splitlines():
        m = re.match(r"- ([^:]+): (.*)$", line.strip())
        if m and m.group(1).strip() in keys:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def _timestamp(text: str, prefix: str):
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line.split(":", 1)[1].strip(), TIME_FORMAT)
            except ValueError:
                return None
    return None


class Report:
    """A report directory of section files. `log` writes one section; `generate` builds report.md."""

    def __init__(self, report_dir: str):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def log(self, section: str, data: list) -> str:
        """Write (replace) one section. `data` holds markdown strings and dicts (rendered as `- key: value`)."""
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"## {section}\ntimestamp: {datetime.datetime.now().strftime(TIME_FORMAT)}\n\n")
            for item in data:
                if not item:
                    continue
                if isinstance(item, str):
                    f.write(item if item.endswith("\n") else item + "\n")
                else:
                    for k, v in item.items():
                        f.write(f"- {k}: {_format(v)}\n")
            f.write("\n")
        return path

    def reset(self) -> None:
        """Remove every section and report.md, and write a fresh header with the start time."""
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        with open(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(header_markdown())
            f.write(f"Run started: {datetime.datetime.now().strftime(TIME_FORMAT)}\n\n---\n\n")

    def generate(self, copy_to: str | None = "report.md") -> str:
        """Write report.md (header, sections in pipeline order, summary table, time and cost). Returns its path."""
        out_path = os.path.join(self.report_dir, "report.md")
        header_path = os.path.join(self.report_dir, "header.md")
        header = open(header_path, encoding="utf-8").read() if os.path.exists(header_path) else ""
        start = _timestamp(header, "Run started:")
        bloat = re.search(r"### Bloat\n(.*?)\n\n", header, re.DOTALL)
        metrics: dict[str, dict[str, str]] = {}
        end = None
        train_hours = 0.0
        parts = [header or "# jaxchat training report\n\n(no header: run `python -m jaxchat.report reset` first)\n\n"]
        for title in SECTIONS:
            path = os.path.join(self.report_dir, slugify(title) + ".md")
            if not os.path.exists(path):
                continue
            text = open(path, encoding="utf-8").read()
            end = _timestamp(text, "timestamp:") or end
            if title == "Base model evaluation":
                metrics["base"] = _extract(text, ["CORE"])
            elif title == "Chat evaluation sft":
                metrics["sft"] = _extract(text, CHAT_METRICS)
            elif title == "Chat evaluation rl":
                metrics["rl"] = _extract(text, CHAT_METRICS)
            spent = _extract(text, ["Total training time"]).get("Total training time", "")
            m = re.fullmatch(r"([\d.,]+)\s*(m|s|h)?", spent)
            if m:  # nanochat writes minutes as "12.34m"
                value = float(m.group(1).replace(",", ""))
                train_hours += value / {"s": 3600, "m": 60, "h": 1}[m.group(2) or "s"]
            parts.append(text + "\n")
        parts.append("## Summary\n\n")
        if bloat:
            parts.append(bloat.group(1) + "\n\n")
        names = sorted({k for m in metrics.values() for k in m}, key=lambda k: (k != "CORE", k == "ChatCORE", k))
        parts.append("| Metric | BASE | SFT | RL |\n|---|---|---|---|\n")
        for name in names:
            parts.append(f"| {name} | " + " | ".join(metrics.get(s, {}).get(name, "-") for s in ("base", "sft", "rl"))
                         + " |\n")
        parts.append("\n")
        if start and end:
            minutes = int((end - start).total_seconds() // 60)
            parts.append(f"Total wall clock time: {minutes // 60}h{minutes % 60}m\n")
        else:
            parts.append("Total wall clock time: unknown\n")
        parts.append(self._cost_line(train_hours))
        with open(out_path, "w", encoding="utf-8") as f:
            f.write("".join(parts))
        if copy_to:
            shutil.copy(out_path, copy_to)
        return out_path

    @staticmethod
    def _cost_line(train_hours: float) -> str:
        import jax

        kind = jax.devices()[0].device_kind.lower()
        price = next((p for k, p in GPU_HOUR_USD.items() if k in kind), None)
        if price is None:
            return f"Training time: {train_hours:.2f}h on {jax.device_count()} x {kind} (not priced)\n"
        cost = train_hours * price * jax.device_count()
        return f"Training cost: ~${cost:,.2f} ({train_hours:.2f}h x {jax.device_count()} GPUs x ${price:.2f}/GPU-hour)\n"


class _NullReport:
    def log(self, *args, **kwargs):
        return None

    def reset(self, *args, **kwargs):
        return None

    def generate(self, *args, **kwargs):
        return None


def get_report():
    """The report of `$JAXCHAT_BASE_DIR/report` on process 0; a no-op stand-in on other processes."""
    if is_main_process():
        return Report(os.path.join(get_base_dir(), "report"))
    return _NullReport()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Reset or generate the jaxchat report card.")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"])
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"new report started in {report.report_dir}")
    else:
        print(f"wrote {report.generate()} (and ./report.md)")


if __name__ == "__main__":
    run_cli(main)
