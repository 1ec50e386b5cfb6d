"""The benchmark's own parsing (timings themselves are benchmarks, not tests)."""

from twbert_export.bench.artifact_bench import parse_tegrastats


def test_the_benchmark_reads_gpu_load_and_board_power_from_tegrastats():
    orin = ("RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729] "
            "EMC_FREQ 0%@2133 GR3D_FREQ {}%@[1300] VDD_IN {}mW/4474mW VDD_SOC 1396mW/1396mW")
    rows = [orin.format(60, 9000), orin.format(100, 11000)]
    assert parse_tegrastats(rows) == {"gpu_load_pct": 80.0, "board_power_mw": 10000.0}
    xavier = "RAM 1000/7772MB GR3D_FREQ 50%@1377 POM_5V_IN 3456/3400 POM_5V_GPU 1000/900"
    assert parse_tegrastats([xavier]) == {"gpu_load_pct": 50.0, "board_power_mw": 3456.0}
    assert parse_tegrastats(["no tegrastats here"]) == {}


def test_the_cascade_commit_bench_times_both_kinds_of_commit():
    from argparse import Namespace

    from twbert_export.bench.cascade_bench import commit_main

    rows = commit_main(Namespace(n=[40]))["rows"]
    assert [r["n"] for r in rows] == [40]
    assert all(r[key] > 0 for r in rows for key in ("bulk_commit_s", "append_8_with_first_stage_s",
                                                      "append_8_index_json_only_s"))
