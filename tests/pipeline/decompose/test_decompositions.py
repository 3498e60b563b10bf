"""Each method on real weight matrices: error falls as rank grows, full rank reconstructs exactly."""

from __future__ import annotations

import pytest
import torch

from krunch.decompose.conv import activation_aware_tucker2, channel_spectra, cp_conv, tucker2
from krunch.decompose.ranks import rank_for_error, tail_fraction
from krunch.decompose.svd import activation_aware_svd, break_even_rank, truncated_svd, whitened_spectrum
from krunch.decompose.tt import core_sizes, factorize, max_ranks, mpo_params, tt_svd, unfolding_spectra


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def test_factorize_is_balanced_and_exact():
    assert factorize(576, 3) == (8, 8, 9)
    assert factorize(1536, 3) == (8, 12, 16)
    assert factorize(97, 3) == (1, 1, 97)  # a prime cannot be split


def test_rank_for_error_and_tail_fraction():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert tail_fraction(s).tolist() == pytest.approx([1.0, 5 / 14, 1 / 14, 0.0])
    assert rank_for_error(s, (1 / 14) ** 0.5) == 2
    assert rank_for_error(s, 0.99) == 1
    assert rank_for_error(s, 0.0) == 3


@pytest.mark.slow
@pytest.mark.parametrize("randomized", [False, True])
def test_svd_error_falls_with_rank_and_full_rank_is_exact(minilm_ffn_weight, randomized):
    w = minilm_ffn_weight
    errors = [relative_error(truncated_svd(w, r, randomized=randomized).to_dense(), w) for r in (16, 64, 192)]
    assert errors[0] > errors[1] > errors[2] > 0
    singular = torch.linalg.svdvals(w.double())
    expected = float((singular[64:].pow(2).sum() / singular.pow(2).sum()).sqrt())
    assert errors[1] == pytest.approx(expected, rel=0.02 if randomized else 1e-4)  # Eckart-Young
    if not randomized:
        assert relative_error(truncated_svd(w, min(w.shape)).to_dense(), w) < 1e-5


@pytest.fixture(scope="module")
def ffn_gram(minilm) -> torch.Tensor:
    """X^T X of the real inputs of MiniLM layer 2's intermediate dense, on calibration text."""
    from krunch.calibration.grams import collect_grams
    from krunch.spec import Calibration

    name = "encoder.layer.2.intermediate.dense"
    return collect_grams(minilm, [name], Calibration(tokens=2048))[name]


def output_error_on(gram: torch.Tensor, w: torch.Tensor):
    """||(W - W') L|| / ||W L|| with G = L L^T: the layer's output error on the calibration activations."""
    whiten = torch.linalg.cholesky(gram + torch.eye(len(gram), dtype=gram.dtype) * 1e-6 * gram.diagonal().mean())
    return lambda approx: float(((approx.double() - w.double()) @ whiten).norm() / (w.double() @ whiten).norm())


@pytest.mark.slow
def test_activation_aware_svd_lowers_output_error_on_real_activations(minilm_ffn_weight, ffn_gram):
    gram, w, rank = ffn_gram, minilm_ffn_weight, 64
    output_error = output_error_on(gram, w)

    aware = activation_aware_svd(w, gram, rank).to_dense()
    plain = truncated_svd(w, rank).to_dense()
    assert output_error(aware) < 0.8 * output_error(plain)
    tail = tail_fraction(whitened_spectrum(w, gram))[rank].sqrt()
    assert output_error(aware) == pytest.approx(float(tail), rel=1e-3)
    assert relative_error(activation_aware_svd(w, gram, min(w.shape)).to_dense(), w) < 1e-4


@pytest.mark.slow
def test_tt_error_falls_with_bond_and_full_bond_is_exact(minilm_ffn_weight):
    w = minilm_ffn_weight
    out_f, in_f = factorize(w.shape[0], 3), factorize(w.shape[1], 3)
    errors = [relative_error(tt_svd(w, out_f, in_f, (r, r)).to_dense(), w) for r in (8, 24, 48)]
    assert errors[0] > errors[1] > errors[2] > 0
    full = tt_svd(w, out_f, in_f, tuple(max_ranks(out_f, in_f)))
    assert relative_error(full.to_dense(), w) < 1e-5
    # TT-SVD's bound: the error is at most the root of the summed squared bond truncation errors.
    ranks = (24, 24)
    bound = sum(float(tail_fraction(s)[r]) for s, r in zip(unfolding_spectra(w, out_f, in_f), ranks, strict=True)) ** 0.5
    assert errors[1] <= bound + 1e-6
    # Why the parameter guard exists: at full bond dimension the chain is bigger than the matrix...
    assert sum(core_sizes(out_f, in_f, tuple(max_ranks(out_f, in_f)))) > w.numel()
    # ...and why saturated bonds are merged: merging never costs storage.
    assert mpo_params(out_f, in_f, (48, 24)) <= sum(core_sizes(out_f, in_f, (48, 24)))
    assert len(tt_svd(w, out_f, in_f, (48, 24)).cores) == 2


@pytest.mark.slow
def test_activation_aware_tt_lowers_output_error_on_real_activations(minilm_ffn_weight, ffn_gram):
    from krunch.decompose.tt import mode_whitening

    w = minilm_ffn_weight
    out_f, in_f = factorize(w.shape[0], 3), factorize(w.shape[1], 3)
    output_error = output_error_on(ffn_gram, w)
    plain = tt_svd(w, out_f, in_f, (48, 40)).to_dense()
    aware = tt_svd(w, out_f, in_f, (48, 40), mode_whitening(ffn_gram, in_f)).to_dense()
    assert output_error(aware) < 0.97 * output_error(plain)
    full = tt_svd(w, out_f, in_f, tuple(max_ranks(out_f, in_f)), mode_whitening(ffn_gram, in_f))
    assert relative_error(full.to_dense(), w) < 1e-4


@pytest.mark.slow
def test_tucker_error_falls_with_rank_and_full_rank_is_exact(easyocr_conv_weight):
    w = easyocr_conv_weight
    errors = [relative_error(tucker2(w, (r, r)).to_dense(), w) for r in (16, 48, 96)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert relative_error(tucker2(w, tuple(w.shape[:2])).to_dense(), w) < 1e-5
    out_spectrum, in_spectrum = channel_spectra(w)
    hosvd_bound = (float(tail_fraction(out_spectrum)[48]) + float(tail_fraction(in_spectrum)[48])) ** 0.5
    assert errors[1] <= hosvd_bound + 1e-6


OCR_CONV = "FeatureExtraction.ConvNet.11"  # the easyocr_conv_weight kernel


def held_out_patch_gram(easyocr, count: int) -> torch.Tensor:
    """X^T X of the conv's input patches on words from the evaluation half of the vocabulary (never calibrated on)."""
    from krunch.calibration.grams import input_rows
    from krunch.data.ocr_words import word_images
    from krunch.evaluation.ocr import pad_right_replicating

    conv, grams = easyocr.module.get_submodule(OCR_CONV), []
    handle = conv.register_forward_pre_hook(lambda module, inputs: grams.append(input_rows(module, inputs[0]).double()))
    try:
        with torch.inference_mode():
            for word in word_images(easyocr.charset, count=count):
                easyocr.module(pad_right_replicating([easyocr.preprocess(word.image)]))
    finally:
        handle.remove()
    return sum(rows.T @ rows for rows in grams)


@pytest.mark.slow
def test_activation_aware_tucker_lowers_output_error_on_held_out_words(easyocr, easyocr_conv_weight):
    from krunch.calibration.grams import collect_grams
    from krunch.spec import Calibration

    w, matrix = easyocr_conv_weight, easyocr_conv_weight.reshape(easyocr_conv_weight.shape[0], -1)
    calibration = collect_grams(easyocr, [OCR_CONV], Calibration(items=64))[OCR_CONV]
    assert calibration.shape == (128 * 9, 128 * 9)
    held_out_error = output_error_on(held_out_patch_gram(easyocr, 32), matrix)
    ranks = (96, 64)
    aware = activation_aware_tucker2(w, calibration, ranks)
    assert aware.ranks == ranks and aware.core.shape == (96, 64, 3, 3)
    plain = held_out_error(tucker2(w, ranks).to_dense().reshape(matrix.shape))
    assert held_out_error(aware.to_dense().reshape(matrix.shape)) < 0.8 * plain
    full = activation_aware_tucker2(w, calibration, tuple(w.shape[:2]))  # the outputs on its own data, reproduced
    assert output_error_on(calibration, matrix)(full.to_dense().reshape(matrix.shape)) < 1e-3


@pytest.mark.slow
def test_cp_error_falls_with_rank(easyocr_conv_weight):
    w = easyocr_conv_weight[:64, :64]  # CP-ALS is slow: a real 64x64x3x3 slice of the kernel
    errors = [relative_error(cp_conv(w, r).to_dense(), w) for r in (8, 64, 256)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2


def test_break_even_rank():
    assert break_even_rank(1536, 384) == 307  # 307 * 1920 = 589,440 < 589,824 <= 308 * 1920
