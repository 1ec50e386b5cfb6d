"""Shared helpers for tests/trt: recorded device strings and a tiny artifact manifest."""

from __future__ import annotations

from twbert_export.artifact.manifest import TRT8_FLAVOUR, CheckpointInfo, FileEntry, Manifest
from twbert_export.artifact.contract import BatchRange, IOContract, TensorSpec

# /etc/nv_tegra_release as JetPack writes it (one line, then the kernel-variant comment lines).
TEGRA_R35_4_1 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
                 "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
                 "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
TEGRA_R36_3_0 = ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
                 "DATE: Mon May  6 17:34:21 UTC 2024\n")
TEGRA_R36_4_3 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                 "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
TEGRA_R38_2_0 = ("# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, "
                 "DATE: Fri Aug 22 00:55:42 UTC 2025\n")
# /proc/device-tree/model ends in a NUL byte.
MODEL_ORIN_NANO = "NVIDIA Jetson Orin Nano Developer Kit\x00"
MODEL_ORIN_NX = "NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00"
MODEL_AGX_ORIN = "NVIDIA Jetson AGX Orin Developer Kit\x00"
MODEL_THOR = "NVIDIA Jetson AGX Thor Developer Kit\x00"
MEMINFO_8GB = "MemTotal:        7620344 kB\nMemFree:         5123456 kB\n"
MEMINFO_16GB = "MemTotal:       15655436 kB\nMemFree:        12123456 kB\n"
MEMINFO_4GB = "MemTotal:        3794668 kB\nMemFree:         2123456 kB\n"
# nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
SMI_H100 = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB\n"
SMI_TWO_GPUS = "NVIDIA A100-SXM4-40GB, 8.0, 40960 MiB\nNVIDIA A100-SXM4-40GB, 8.0, 40960 MiB\n"
SMI_T4 = "Tesla T4, 7.5, 15360 MiB\n"
SMI_NO_DEVICE = "No devices were found\n"
# `nvpmodel -q` on an AGX Orin in MAXN (mode 0).
NVPMODEL_MAXN = "NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"


def tiny_contract(batch: BatchRange = BatchRange(1, 2, 4)) -> IOContract:
    B = "batch"
    return IOContract(
        inputs=(TensorSpec("video", "float32", (B, 4, 3, 32, 32)),
                TensorSpec("input_ids", "int64", (B, 8)),
                TensorSpec("attention_mask", "int64", (B, 8))),
        outputs=(TensorSpec("itm_logits", "float32", (B, 2)),
                 TensorSpec("itc_sim", "float32", (B,)),
                 TensorSpec("frame_scores_1", "float32", (B, 4)),
                 TensorSpec("frame_indices_1", "int64", (B, 2))),
        batch=batch, schedule="4-2")


def artifact_manifest(precisions: tuple[str, ...] = ("fp32", "fp16", "int8"),
                      contract: IOContract | None = None, trt8: bool = True) -> Manifest:
    """A manifest with what the device kit reads (contract, schedule, files): each precision's
    file and, unless trt8=False (an older artifact), its TensorRT 8.x twin (flavour trt8)."""
    contract = contract or tiny_contract()
    files = [FileEntry("model", p, f"model.{p}.onnx", f"{i}" * 64, 1000)
             for i, p in enumerate(precisions)]
    if trt8:
        files += [FileEntry("model", p, f"model.{p}.trt8.onnx", f"{i}a" * 32, 1000,
                            flavour=TRT8_FLAVOUR) for i, p in enumerate(precisions)]
    return Manifest(
        checkpoint=CheckpointInfo("ckpt.pt", "c" * 64, "twbert-export"), model_config={},
        schedule=contract.schedule, contract=contract, files=files,
        validation_data={}, parity={p: True for p in precisions}, tools={},
        created="2026-01-01T00:00:00+0000", tokenizer="tokenizer.json",
        flavour_parity={TRT8_FLAVOUR: {p: True for p in precisions}} if trt8 else {})


def tiny_split_contracts(batch: BatchRange = BatchRange(1, 2, 4)) -> dict[str, IOContract]:
    """The four split graphs' contracts for the tiny contract (`split.split_contracts`'s cut:
    text -> text_embeds, text_cls; video_stem -> stem; select -> itc_sim, video_embeds, the
    selection; fuse -> itm_logits), with tiny widths (D = 6)."""
    B, mono = "batch", tiny_contract(batch)
    spec = {t.name: t for t in (*mono.inputs, *mono.outputs)}
    text_embeds = TensorSpec("text_embeds", "float32", (B, 8, 6))
    text_cls = TensorSpec("text_cls", "float32", (B, 6))
    stem = TensorSpec("stem", "float32", (B, 4, 5, 6))
    video_embeds = TensorSpec("video_embeds", "float32", (B, 3, 6))
    graphs = {
        "text": ((spec["input_ids"], spec["attention_mask"]), (text_embeds, text_cls)),
        "video_stem": ((spec["video"],), (stem,)),
        "select": ((stem, text_cls), (spec["itc_sim"], video_embeds, spec["frame_scores_1"],
                                      spec["frame_indices_1"])),
        "fuse": ((text_embeds, spec["attention_mask"], video_embeds), (spec["itm_logits"],)),
    }
    return {g: IOContract(i, o, batch, mono.task, mono.schedule, mono.opset)
            for g, (i, o) in graphs.items()}


def split_manifest(precisions: tuple[str, ...] = ("fp32", "fp16"), trt8: bool = True) -> Manifest:
    """`artifact_manifest` with the four split graphs beside `model`: a file per graph and
    precision (and its trt8 twin), and each graph's contract."""
    manifest = artifact_manifest(precisions, trt8=trt8)
    for graph in ("text", "video_stem", "select", "fuse"):
        for i, p in enumerate(precisions):
            manifest.files.append(FileEntry(graph, p, f"{graph}.{p}.onnx", f"{i}b" * 32, 100))
            if trt8:
                manifest.files.append(FileEntry(graph, p, f"{graph}.{p}.trt8.onnx", f"{i}c" * 32,
                                                100, flavour=TRT8_FLAVOUR))
    manifest.graph_contracts = tiny_split_contracts()
    return manifest
