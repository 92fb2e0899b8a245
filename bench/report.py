"""The benchmark report: the machine, the figures as Markdown tables, and the targets met or missed."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

MIB = 1024 * 1024

#: Backfill rows/s as a share of the limit's rows/s.
MIN_THROUGHPUT_RATIO = 0.8
MAX_PEAK_RSS_MIB = 200
#: Largest ratio of a figure at the largest size to the same figure at the smallest size.
MAX_GROWTH = 1.2
MAX_STATEMENT_SECONDS = 1.0
#: Exports that write to the S3 API, whose rows show the S3 server's CPU time.
S3_EXPORTS = ("backfill_s3", "peer")


def describe_machine(data_dir: Path, server_version: str) -> dict:
    """Describe the cores, memory, CPU, Python, PostgreSQL and the disk that contains ``data_dir``."""
    meminfo = Path("/proc/meminfo").read_text()
    memory_kib = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M).group(1))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    usage = shutil.disk_usage(data_dir)
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": server_version,
        "disk": _describe_disk(data_dir),
        "disk_size_gib": round(usage.total / 1024**3),
        "disk_free_gib": round(usage.free / 1024**3),
        "load_average_start": os.getloadavg(),
    }


def _describe_disk(path: Path) -> str:
    """Name the block device under ``path`` and whether the kernel reports it as rotational."""
    try:
        source = subprocess.run(
            ["findmnt", "--noheadings", "--output", "SOURCE,FSTYPE", "--target", str(path)],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if len(source) < 2:
        return "unknown"
    device, fstype = source[0], source[1]
    rotational = Path(f"/sys/block/{Path(device).name}/queue/rotational")
    kind = ""
    if rotational.exists():
        kind = ", reported rotational" if rotational.read_text().strip() == "1" else ", reported non-rotational"
    return f"{device} ({fstype}{kind})"


def _mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def evaluate_targets(report: dict) -> list[dict]:
    """Return each target with its measured value and whether it is met."""
    targets = []
    sizes = report["sizes"]
    for size in sizes:
        for destination in ("s3", "local"):
            ratio = size[f"backfill_{destination}"]["ratio_to_limit"]
            targets.append(
                {
                    "target": f"backfill to {destination} at {size['total_rows']:,} rows: rows/s >= "
                    f"{MIN_THROUGHPUT_RATIO} x the limit",
                    "value": f"{ratio:.2f}",
                    "met": ratio >= MIN_THROUGHPUT_RATIO,
                }
            )
    for destination in ("s3", "local"):
        peaks = [size[f"backfill_{destination}"]["peak_rss_bytes"] for size in sizes]
        targets.append(
            {
                "target": f"backfill to {destination}: peak RSS <= {MAX_PEAK_RSS_MIB} MiB at every size",
                "value": ", ".join(f"{_mib(peak)} MiB" for peak in peaks),
                "met": max(peaks) <= MAX_PEAK_RSS_MIB * MIB,
            }
        )
        if len(sizes) > 1:
            growth = peaks[-1] / peaks[0]
            targets.append(
                {
                    "target": f"backfill to {destination}: peak RSS at {sizes[-1]['total_rows']:,} rows <= "
                    f"{MAX_GROWTH} x at {sizes[0]['total_rows']:,} rows",
                    "value": f"{growth:.2f}",
                    "met": growth <= MAX_GROWTH,
                }
            )
    steady = report["steady_state"]
    if len(steady) > 1:
        growth = steady[-1]["shared_buffers"] / steady[0]["shared_buffers"]
        targets.append(
            {
                "target": f"steady state: shared buffers on the {steady[-1]['table_rows']:,}-row table <= "
                f"{MAX_GROWTH} x on the {steady[0]['table_rows']:,}-row table",
                "value": f"{growth:.2f}",
                "met": growth <= MAX_GROWTH,
            }
        )
    drain = report["drain"]
    slowest = max(drain["slowest_page_statement_seconds"], drain["slowest_statement_ms"] / 1000)
    targets.append(
        {
            "target": f"drain under statement_timeout = {drain['statement_timeout']}: no statement over "
            f"{MAX_STATEMENT_SECONDS:.0f} s and none cancelled",
            "value": f"slowest {slowest:.3f} s, {drain['cancelled_pages']} cancelled",
            "met": slowest <= MAX_STATEMENT_SECONDS and drain["cancelled_pages"] == 0,
        }
    )
    return targets


def render_markdown(report: dict) -> str:
    """Render the report as Markdown tables."""
    machine = report["machine"]
    lines = [
        "## Machine",
        "",
        f"- {machine['cores']} cores ({machine['cpu_model']}), {machine['memory_gib']} GiB of memory, "
        f"Linux {machine['kernel']}",
        f"- Python {machine['python']}, PostgreSQL {machine['postgresql']}",
        f"- Disk: {machine['disk']}, {machine['disk_size_gib']} GiB, {machine['disk_free_gib']} GiB free at the start",
        "- Load average (1, 5, 15 min) at the start: "
        + ", ".join(f"{value:.2f}" for value in machine["load_average_start"])
        + "; at the end: "
        + ", ".join(f"{value:.2f}" for value in report["load_average_end"]),
        "",
        "## Backfill, the limit and the peer",
        "",
        f"Medians of {report['settings']['repeat']} runs, except where a row says one run. Peak RSS is the "
        f"largest of the runs and, for the backfill, of its processes. The backfill exports ranges in "
        f"{report['settings']['range_workers']} range processes at a time unless a row says otherwise. RSS after "
        "setup is the largest RSS of the backfill's processes once their imports, connections and S3 clients are "
        "ready, before the first statement. S3 server CPU is the moto server's, which runs in the benchmark's "
        "process on the same cores.",
        "",
        "| rows (main + legacy) | export | seconds | rows/s | ratio to the limit | peak RSS MiB | "
        "RSS after setup MiB | worker CPU s | server CPU s | S3 server CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in report["sizes"]:
        label = f"{size['total_rows']:,} ({size['rows']:,} + {size['legacy_rows']:,})"
        for name, title in (
            ("limit", "limit: COPY to a local file"),
            ("limit_unordered", "COPY without ORDER BY (one run)"),
            ("backfill_s3", "backfill to the S3 API"),
            ("backfill_local", "backfill to a local folder"),
            ("backfill_local_one_range", "backfill to a local folder, one range at a time (one run)"),
            ("peer", "peer: SqlToS3Operator"),
        ):
            figures = size.get(name)
            if figures is None:
                continue
            ratio = figures.get("ratio_to_limit")
            lines.append(
                f"| {label} | {title} | {figures['seconds']:.1f} | {_rate(figures['rows_per_second'])} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {_mib(figures['peak_rss_bytes'])} | "
                f"{_mib(figures['setup_rss_bytes']) if 'setup_rss_bytes' in figures else ''} | "
                f"{figures['worker_cpu_seconds']:.1f} | {_optional(figures.get('server_cpu_seconds'))} | "
                f"{_optional(figures.get('s3_server_cpu_seconds')) if name in S3_EXPORTS else ''} |"
            )
    lines += [
        "",
        "## Steady state: one run exporting new rows",
        "",
        "| table rows | new rows | seconds | statements | shared buffers | page statements | "
        "shared buffers of page statements |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["steady_state"]:
        lines.append(
            f"| {run['table_rows']:,} | {run['rows']:,} | {run['seconds']:.2f} | {run['statements']} | "
            f"{run['shared_buffers']:,} | {run['reader_statements']} | {run['reader_shared_buffers']:,} |"
        )
    drain = report["drain"]
    lines += [
        "",
        "## Drain of a 30-day backlog under a statement timeout",
        "",
        "| rows | statement_timeout | runs | page statements | all statements | slowest page statement s | "
        "slowest statement ms | page statements' total s | cancelled pages | seconds | rows/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {drain['rows']:,} | {drain['statement_timeout']} | {drain['runs']} | {drain['page_statements']} | "
        f"{drain['statements']} | {drain['slowest_page_statement_seconds']:.3f} | {drain['slowest_statement_ms']:.1f} | "
        f"{drain['reader_exec_seconds']:.1f} | {drain['cancelled_pages']} | {drain['seconds']:.1f} | "
        f"{_rate(drain['rows'] / drain['seconds'])} |",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['value']} | {'met' if target['met'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
