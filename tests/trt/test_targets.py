import subprocess

import pytest
from trtdata import (MEMINFO_4GB, MEMINFO_8GB, MEMINFO_16GB, MODEL_AGX_ORIN, MODEL_ORIN_NANO,
                     MODEL_ORIN_NX, MODEL_THOR, NVPMODEL_MAXN, SMI_H100, SMI_NO_DEVICE, SMI_T4,
                     SMI_TWO_GPUS, TEGRA_R35_4_1,
                     TEGRA_R36_3_0, TEGRA_R36_4_3, TEGRA_R38_2_0)

from twbert_export.trt import targets
from twbert_export.trt.targets import (PRESETS, TargetError, classify, detect_platform,
                                       parse_nvidia_smi, parse_tegra_release, preset_for,
                                       resolve_target)


def test_presets_cap_the_workspace_for_8gb_boards():
    assert set(PRESETS) == {"orin-nano-8gb", "orin-nx", "orin-nx-16gb", "agx-orin", "thor",
                            "datacenter"}
    for name in ("orin-nano-8gb", "orin-nx"):  # 8 GB shared CPU/GPU memory
        assert PRESETS[name].jetson and PRESETS[name].workspace_mb <= 2048
    assert PRESETS["orin-nano-8gb"].dla_cores == 0  # no DLA on the Nano
    assert PRESETS["agx-orin"].dla_cores == 2
    assert (PRESETS["orin-nx"].dla_cores, PRESETS["orin-nx-16gb"].dla_cores) == (1, 2)
    assert PRESETS["thor"].dla_cores == 0  # no DLA on Thor
    assert not PRESETS["datacenter"].jetson
    assert all(0 <= t.builder_optimization_level <= 5 for t in PRESETS.values())


@pytest.mark.parametrize("text, l4t, jetpack, trt", [
    (TEGRA_R35_4_1, "35.4.1", "5.1.2", "8.5.2"),
    (TEGRA_R36_3_0, "36.3.0", "6.0", "8.6.2"),
    (TEGRA_R36_4_3, "36.4.3", "6.2", "10.3"),
    (TEGRA_R38_2_0, "38.2.0", "7.0", "10.13"),
])
def test_l4t_release_gives_jetpack_and_its_tensorrt(text, l4t, jetpack, trt):
    assert parse_tegra_release(text) == l4t
    platform = classify(text, MODEL_ORIN_NANO, MEMINFO_8GB)
    assert platform.jetson and platform.l4t == l4t and platform.jetpack == jetpack
    assert platform.expected_tensorrt() == trt


def test_not_a_tegra_file():
    assert parse_tegra_release("Ubuntu 22.04") is None
    assert parse_tegra_release("") is None


@pytest.mark.parametrize("model, preset", [
    (MODEL_ORIN_NANO, "orin-nano-8gb"), (MODEL_ORIN_NX, "orin-nx"),
    (MODEL_AGX_ORIN, "agx-orin"), (MODEL_THOR, "thor"),
])
def test_auto_picks_the_board_preset(model, preset):
    target, why = preset_for(classify(TEGRA_R36_4_3, model, MEMINFO_8GB))
    assert target.name == preset
    assert "Jetson model" in why


def test_orin_nx_16gb_is_told_apart_by_memory_and_has_two_dla_cores():
    target, why = preset_for(classify(TEGRA_R36_4_3, MODEL_ORIN_NX, MEMINFO_16GB))
    assert target.name == "orin-nx-16gb" and target.dla_cores == 2 and "MB memory" in why


def test_orin_nano_4gb_gets_a_smaller_workspace():
    target, why = preset_for(classify(TEGRA_R36_4_3, MODEL_ORIN_NANO, MEMINFO_4GB))
    assert target.name == "orin-nano-8gb" and target.workspace_mb < 1024
    assert "MB memory" in why


def test_unknown_jetson_model_falls_back_by_l4t():
    assert preset_for(classify(TEGRA_R38_2_0, "", None))[0].name == "thor"
    assert preset_for(classify(TEGRA_R35_4_1, "", None))[0].name == "orin-nano-8gb"


def test_nvidia_smi_rows():
    assert parse_nvidia_smi(SMI_H100) == [{"name": "NVIDIA H100 80GB HBM3",
                                           "compute_capability": "9.0", "memory_mb": 81559}]
    assert len(parse_nvidia_smi(SMI_TWO_GPUS)) == 2
    assert parse_nvidia_smi(SMI_NO_DEVICE) == []


def test_datacenter_gpu_preset_carries_its_compute_capability():
    target, why = preset_for(classify(nvidia_smi=SMI_H100))
    assert target.name == "datacenter" and target.compute_capability == "9.0"
    assert "H100" in why
    small, _ = preset_for(classify(nvidia_smi=SMI_T4))  # 16 GB card: a quarter of memory
    assert small.workspace_mb == 15360 // 4


def test_no_gpu_is_a_clear_error():
    with pytest.raises(TargetError, match="no NVIDIA GPU found"):
        preset_for(classify(nvidia_smi=SMI_NO_DEVICE))


def test_named_target_and_unknown_name():
    assert resolve_target("agx-orin")[0] is PRESETS["agx-orin"]
    with pytest.raises(TargetError, match="orin-nano-8gb"):
        resolve_target("xavier")


def test_detect_platform_reads_a_jetson_filesystem(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(TEGRA_R36_4_3)
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text(MODEL_AGX_ORIN)
    (tmp_path / "proc/meminfo").write_text(MEMINFO_8GB)
    for device, lo, hi in (("17000000.gpu", "1300500000", "1300500000"),
                           ("bpmp-emc", "3199000000", "3199000000")):  # after jetson_clocks
        (tmp_path / "sys/class/devfreq" / device).mkdir(parents=True)
        (tmp_path / "sys/class/devfreq" / device / "min_freq").write_text(lo + "\n")
        (tmp_path / "sys/class/devfreq" / device / "max_freq").write_text(hi + "\n")

    def nvpmodel_only(cmd, **kwargs):
        assert cmd == ["nvpmodel", "-q"], "nvidia-smi must not be needed on a Jetson"
        return subprocess.CompletedProcess(cmd, 0, stdout=NVPMODEL_MAXN, stderr="")

    platform = detect_platform(tmp_path, run=nvpmodel_only)
    assert platform.jetson and platform.l4t == "36.4.3"
    assert platform.power_mode == "MAXN" and platform.clocks_locked is True
    assert resolve_target("auto", platform)[0].name == "agx-orin"
    machine = targets.machine_info("10.3.0", platform)  # what the sidecar records
    assert (machine.power_mode, machine.clocks_locked, machine.jetpack) == ("MAXN", True, "6.2")


def test_power_mode_and_clock_state_from_recorded_text():
    assert targets.parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: 15W\n2\n") == "15W"
    assert targets.parse_nvpmodel("nvpmodel: command not found") is None
    assert targets.clocks_locked({"gpu": ("306000000", "1300500000")}) is False  # floating
    assert targets.clocks_locked({}) is None  # nothing readable: unknown, not "unlocked"


def test_detect_platform_uses_nvidia_smi_off_jetson(tmp_path):
    def smi(cmd, **kwargs):
        assert cmd[0] == "nvidia-smi" and "--query-gpu=name,compute_cap,memory.total" in cmd
        return subprocess.CompletedProcess(cmd, 0, stdout=SMI_H100, stderr="")

    platform = detect_platform(tmp_path, run=smi)
    assert not platform.jetson and platform.compute_capability == "9.0"


def test_detect_platform_without_nvidia_smi(tmp_path):
    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert detect_platform(tmp_path, run=missing) == targets.Platform(jetson=False)

