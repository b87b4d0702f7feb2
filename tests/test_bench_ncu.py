"""bench/ncu_layers.py's reading of Nsight Compute's raw CSV page (the GPU run's summary depends on it): columns by
name, the units row, time units, numbers with thousands separators, non-numeric values, the stall reasons ranked,
and the lines around the CSV that are not part of it."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ncu_layers  # noqa: E402

HEADER = ['ID', 'Process ID', 'Process Name', 'Host Name', 'Kernel Name', 'Context', 'Stream', 'Block Size',
          'Grid Size', 'Device', 'CC', 'gpu__time_duration.sum', 'dram__throughput.avg.pct_of_peak_sustained_elapsed',
          'launch__registers_per_thread', 'smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio',
          'smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio', 'device__attribute_display_name']
UNITS = [''] * 11 + ['nsecond', '%', 'register/thread', '', '', '', '']
ROWS = [['0', '77', 'python3', 'localhost', '_modconv_fwd_kernel', '1', '7', '(128, 1, 1)', '(8192, 1, 16)', '0',
         '9.0', '1,733,120', '31.5', '72', '4.25', '0.5', '1.75', 'NVIDIA H200'],
        ['1', '77', 'python3', 'localhost', '_dgrad_kernel', '1', '7', '(128, 1, 1)', '(8192, 1, 16)', '0', '9.0',
         '2,113,000', '40.25', '92', '0.75', '2.5', 'n/a', 'NVIDIA H200']]


def as_csv(rows):
    return "\n".join(",".join(f'"{c}"' for c in row) for row in rows)


def test_parse_raw_csv():
    text = "==PROF== Connected to process 77\n" + as_csv([HEADER, UNITS] + ROWS) + "\n==PROF== Disconnected\n"
    fwd, dgrad = ncu_layers.parse_raw_csv(text)
    assert (fwd["name"], fwd["grid"], fwd["block"]) == ("_modconv_fwd_kernel", "(8192, 1, 16)", "(128, 1, 1)")
    assert fwd["gpu__time_duration.sum"] == pytest.approx(1733.12)  # ns -> µs
    assert fwd["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 31.5
    assert fwd["launch__registers_per_thread"] == 72
    assert "device__attribute_display_name" not in fwd  # not a number
    assert fwd["stalls"] == [("long_scoreboard", 4.25), ("short_scoreboard", 1.75), ("barrier", 0.5)]
    assert dgrad["stalls"] == [("barrier", 2.5), ("long_scoreboard", 0.75)]  # "n/a" left out
    table = ncu_layers.summary_table([fwd, dgrad], top_stalls=2)
    assert table[0].split(" | ")[3:6] == ["µs", "DRAM %", "registers"]  # only the metrics ncu reported
    assert "| `_modconv_fwd_kernel` | (8192, 1, 16) | (128, 1, 1) | 1733 | 31.5 | 72 |" in table[2]
    assert table[2].endswith("long_scoreboard 4.25, short_scoreboard 1.75 |")


def test_parse_raw_csv_without_units_row_or_rows():
    fwd, = ncu_layers.parse_raw_csv(as_csv([HEADER, ROWS[0]]))
    assert fwd["gpu__time_duration.sum"] == 1733120  # no units row: values as printed
    assert ncu_layers.parse_raw_csv("==ERROR== Failed to initialize the profiler\n") == []


def test_driver_summarises_each_layer(tmp_path):
    """main() runs ncu once per layer and reads its report back as CSV (here a stand-in that writes a report and
    prints that CSV, or fails as ncu does where it cannot read the counters) and writes the summary, the failure's
    message included."""
    csv_text = as_csv([HEADER, UNITS] + ROWS)
    fake = tmp_path / "ncu"
    fake.write_text("#!/usr/bin/env python3\nimport sys\nargs = sys.argv[1:]\n"
                    "if '--import' in args:\n"
                    "    assert open(args[args.index('--import') + 1]).read() == 'report'\n"
                    f"    print({csv_text!r})\n    sys.exit()\n"
                    "layer = args[args.index('--child') + 1]\n"
                    "assert args[args.index('--kernel-name') + 1] == 'regex:^_'\n"
                    "if layer == 'convs.14':\n    sys.exit('==ERROR== Failed to initialize the profiler')\n"
                    "open(args[args.index('--export') + 1], 'w').write('report')\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    ncu_layers.main(["--out", str(out), "--layers", "convs.15", "convs.14", "--ncu", str(fake)])
    md = (out / "ncu_layers.md").read_text()
    assert "## convs.15\n\n- exit 0" in md and "2 kernels profiled" in md and "`_dgrad_kernel`" in md
    assert "## convs.14\n\n- exit 1" in md and "Failed to initialize the profiler" in md
    assert (out / "ncu_convs.15.csv").exists() and not list(out.glob("*.ncu-rep"))  # the CSV kept, the report not


def test_stalls_from_pc_samples_where_no_ratios():
    """Where ncu reported no per-issue stall ratios, the PC-sampling counts rank the reasons (their _not_issued
    twins left out)."""
    header = HEADER[:11] + ["smsp__pcsamp_warps_issue_stalled_wait", "smsp__pcsamp_warps_issue_stalled_barrier",
                            "smsp__pcsamp_warps_issue_stalled_barrier_not_issued"]
    k, = ncu_layers.parse_raw_csv(as_csv([header, ROWS[0][:11] + ["120", "340", "999"]]))
    assert k["stalls"] == [("barrier", 340), ("wait", 120)]
