"""Modality tokenizers for AnyGPT-style discrete sequence modelling (``lmlab train anygpt tokenizers``).

Paper: **AnyGPT: Unified Multimodal LLM with Discrete Sequence Modeling**, Zhan et al., arXiv 2402.12226.
AnyGPT turns every modality into discrete ids (SEED-2 for images: 32 tokens of an 8192-code book;
SpeechTokenizer RVQ-1 for speech: 50 Hz, 1024 codes; Encodec-32k for music: 4 x 2048 codes, frame-interleaved)
and de-tokenizes generated ids with each tokenizer's decoder. This module gives the common interface

    encode(signal) -> list[int]     decode(ids) -> signal     codebook_size     tokens_per_item / per second

and two tokenizers that lmlab trains itself on data it makes offline (the CPU miniature):

* ``vqvae-digits`` -- a VQ-VAE (van den Oord et al. 2017) on scikit-learn's 8x8 digits. Encoder
  conv 8x8 -> 2x2 latent grid (**4 tokens / image**), codebook K=64, straight-through estimator::

      z_e = E(x)  (B, d, 2, 2);  k = argmin_j ||z_e - e_j||;  z_q = e_k
      L = ||x - D(z_e + sg(z_q - z_e))||^2 + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2,  beta = 0.25

  with dead-code restarts (unused codes are re-seeded from random encoder outputs every 100 steps).
* ``kmeans-logmel`` -- HuBERT-units style speech tokens: 40-band log-mel frames at 50 Hz (hop 320 @ 16 kHz),
  k-means K=64, one unit per frame. De-tokenizer: centroid log-mel -> pseudo-inverse mel -> Griffin-Lim
  (32 iterations).

The speech comes from :func:`synth_word`, a small additive formant synthesizer of the spoken digit words
"zero".."nine" (harmonics of a glottal f0 shaped by three formants, plus band-limited noise for fricatives
and bursts); speakers differ in pitch, vocal-tract length (formant scale), speed and breathiness, and the
held-out set uses voice/speed combinations never seen in training.

Adapters for the public tokenizers (``encodec``: transformers' ``EncodecModel``; ``speechtokenizer``: the
``speechtokenizer`` package; ``seed2``: SEED-tokenizer-2 code) load lazily and raise one clear line when
the package or the weights are missing.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

SR = 16_000
"""Speech sample rate (Hz)."""
HOP = 320
"""Log-mel hop (samples): 50 frames / s, SpeechTokenizer's rate."""
N_FFT = 640
"""STFT size (samples; Hann window, 50% overlap so Griffin-Lim converges)."""
N_MELS = 40
"""Mel bands."""
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIDE = 8
"""Side of the built-in image modality (scikit-learn digits)."""


class TokenizerError(LmlabError):
    """Bad input to a modality tokenizer (wrong image size/format, empty audio, missing weights ...)."""


@runtime_checkable
class ModalityTokenizer(Protocol):
    """What AnyGPT needs from a modality tokenizer."""

    modality: str
    codebook_size: int

    def encode(self, signal: Any) -> list[int]: ...

    def decode(self, ids: list[int]) -> Any: ...


# ----------------------------------------------------------------------------------------------------
# images: scikit-learn digits + VQ-VAE


def load_digit_images(n_test: int = 297) -> dict[str, np.ndarray]:
    """scikit-learn's 1797 8x8 digits scaled to [0, 1]; the last ``n_test`` are held out (as in the miniature)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LmlabError("the built-in image set needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    y = d.target.astype(np.int64)
    return {"train_x": x[:-n_test], "train_y": y[:-n_test], "test_x": x[-n_test:], "test_y": y[-n_test:]}


def check_image(img: Any) -> np.ndarray:
    """An 8x8 float array in [0, 1] from an array, a PIL image or a PNG/JPEG path (clear error otherwise).

    Square images whose side is a multiple of 8 (e.g. the 64x64 PNGs lmlab writes) are box-averaged to 8x8."""
    if isinstance(img, (str, Path)):
        p = Path(img)
        if not p.is_file():
            raise TokenizerError(f"image not found: {p}")
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise TokenizerError("reading images needs Pillow (pip install pillow)") from None
        try:
            with Image.open(p) as im:
                img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError):
            raise TokenizerError(f"{p} is not a readable image (PNG/JPEG/BMP expected)") from None
    elif hasattr(img, "convert") and hasattr(img, "size"):  # PIL image
        img = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].mean(-1)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] % IMAGE_SIDE:
        raise TokenizerError(f"unsupported image size {tuple(a.shape)}: the digit tokenizer takes square "
                             f"{IMAGE_SIDE}x{IMAGE_SIDE} images (or multiples of {IMAGE_SIDE}, box-averaged)")
    f = a.shape[0] // IMAGE_SIDE
    a = a.reshape(IMAGE_SIDE, f, IMAGE_SIDE, f).mean((1, 3))
    if not np.isfinite(a).all():
        raise TokenizerError("image has NaN/inf pixels")
    if a.max() > 1.0 + 1e-6 or a.min() < 0:
        raise TokenizerError(f"pixel values must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
    return a


class VQVAE(nn.Module):
    """Conv VQ-VAE: (B, 1, 8, 8) -> (B, d, 2, 2) latents -> K codes -> (B, 1, 8, 8)."""

    def __init__(self, codebook_size: int = 64, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),  # 2x2
            nn.Conv2d(hidden, dim, 1))
        self.dec = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(hidden, 1, 3, padding=1))
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * 0.1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, h, w) -> (codes (B, h*w), z_q (B, d, h, w))."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, d)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T
                + self.codebook.pow(2).sum(1)[None])  # (B*h*w, K)
        codes = dist.argmin(1)
        zq = self.codebook[codes].reshape(b, h, w, d).permute(0, 3, 1, 2)
        return codes.reshape(b, h * w), zq

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, 4) -> images (B, 8, 8) in [0, 1]."""
        b, n = codes.shape
        s = int(math.isqrt(n))
        zq = self.codebook[codes].reshape(b, s, s, -1).permute(0, 3, 1, 2)
        return torch.sigmoid(self.dec(zq))[:, 0]

    def forward(self, x: torch.Tensor, beta: float = 0.25):
        z = self.enc(x[:, None])  # (B, d, 2, 2)
        codes, zq = self.quantize(z)
        zst = z + (zq - z).detach()
        recon = torch.sigmoid(self.dec(zst))[:, 0]  # (B, 8, 8)
        loss = (nn.functional.mse_loss(recon, x) + nn.functional.mse_loss(zq, z.detach())
                + beta * nn.functional.mse_loss(z, zq.detach()))
        return loss, recon, codes, z


def train_vqvae(images: np.ndarray, codebook_size: int = 64, steps: int = 3000, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, restart_every: int = 100) -> VQVAE:
    """Train the digit VQ-VAE with dead-code restarts; returns the model in eval mode."""
    if len(images) < batch_size:
        raise LmlabError(f"need at least {batch_size} images to train the VQ-VAE, got {len(images)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VQVAE(codebook_size)
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    used = torch.zeros(codebook_size)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        loss, _, codes, z = model(x_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        used += torch.bincount(codes.flatten(), minlength=codebook_size).float()
        if restart_every and (step + 1) % restart_every == 0 and step < steps * 0.8:
            dead = (used == 0).nonzero().flatten()
            if len(dead):
                zf = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                pick = torch.randint(0, len(zf), (len(dead),), generator=g)
                with torch.no_grad():
                    model.codebook[dead] = zf[pick] + 0.01 * torch.randn(len(dead), zf.shape[1], generator=g)
            used.zero_()
        if (step + 1) % 500 == 0:
            log.info("vqvae step %d loss %.4f", step + 1, loss.item())
    return model.eval()


class VQImageTokenizer:
    """``vqvae-digits``: 8x8 image <-> 4 ids from a K-code book."""

    modality = "image"

    def __init__(self, model: VQVAE):
        self.model = model.eval()
        self.codebook_size = int(model.codebook.shape[0])
        self.tokens_per_item = 4

    def encode(self, img: Any) -> list[int]:
        a = check_image(img)
        with torch.no_grad():
            codes, _ = self.model.quantize(self.model.enc(torch.from_numpy(a)[None, None]))
        return codes[0].tolist()

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """(N, 8, 8) -> (N, 4) int64."""
        with torch.no_grad():
            codes, _ = self.model.quantize(self.model.enc(torch.from_numpy(np.asarray(images, np.float32))[:, None]))
        return codes.numpy()

    def decode(self, ids: list[int]) -> np.ndarray:
        ids = list(ids)
        if len(ids) != self.tokens_per_item or not all(0 <= i < self.codebook_size for i in ids):
            raise TokenizerError(f"image decode needs {self.tokens_per_item} codes in [0, {self.codebook_size}), "
                                 f"got {ids}")
        with torch.no_grad():
            return self.model.decode_codes(torch.tensor([ids]))[0].numpy()

    def decode_batch(self, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.decode_codes(torch.as_tensor(np.asarray(codes), dtype=torch.long)).numpy()

    def save(self, path: str | Path) -> Path:
        from lmlab.core.runs import save_tensors

        return save_tensors(Path(path), {k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                            {"kind": "vqvae-digits", "codebook_size": self.codebook_size})

    @classmethod
    def load(cls, path: str | Path) -> VQImageTokenizer:
        from safetensors.torch import load_file

        sd = load_file(str(path))
        model = VQVAE(int(sd["codebook"].shape[0]), int(sd["codebook"].shape[1]), int(sd["enc.0.weight"].shape[0]))
        model.load_state_dict(sd)
        return cls(model)


def save_png(img: np.ndarray, path: str | Path, scale: int = 8) -> Path:
    """Write an (H, W) [0, 1] image as a grayscale PNG, upscaled ``scale`` x (nearest), atomically."""
    from PIL import Image

    from lmlab.core.runs import atomic_path

    a = (np.clip(np.asarray(img, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    a = np.kron(a, np.ones((scale, scale), dtype=np.uint8))
    with atomic_path(path) as tmp:
        Image.fromarray(a, mode="L").save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# speech: a formant synthesizer of the digit words


# (F1, F2, F3) Hz, adult male targets (Peterson & Barney 1952 / Klatt 1980 tables)
_VOWELS = {"IY": (270, 2290, 3010), "IH": (390, 1990, 2550), "EH": (530, 1840, 2480), "AH": (620, 1200, 2550),
           "AO": (570, 840, 2410), "UW": (300, 870, 2240), "OW": (450, 900, 2400), "AA": (730, 1090, 2440),
           "ER": (490, 1350, 1690), "W": (300, 650, 2200), "R": (420, 1300, 1600), "N": (280, 1500, 2500)}
# phoneme: (kind, base duration s, vowel/formant key or noise band (lo, hi) Hz, amplitude)
_PHONES: dict[str, tuple[str, float, Any, float]] = {
    "IY": ("v", .13, "IY", 1.0), "IH": ("v", .09, "IH", 1.0), "EH": ("v", .10, "EH", 1.0),
    "AH": ("v", .09, "AH", 1.0), "AO": ("v", .13, "AO", 1.0), "UW": ("v", .14, "UW", 1.0),
    "OW": ("v", .14, "OW", 1.0), "AA": ("v", .10, "AA", 1.0), "W": ("v", .06, "W", 0.6), "R": ("v", .06, "R", 0.7),
    "N": ("n", .07, "N", 0.35), "Z": ("zf", .08, (3500, 7000), 0.35), "V": ("zf", .06, (1200, 6000), 0.2),
    "S": ("f", .11, (4000, 7500), 0.6), "F": ("f", .10, (1200, 7000), 0.2), "TH": ("f", .08, (1500, 7500), 0.12),
    "T": ("stop", .07, (3000, 6500), 0.7), "K": ("stop", .07, (1500, 3500), 0.7), "_": ("sil", .05, None, 0.0),
}
_WORDS = {"zero": "Z IH R OW UW", "one": "W AH N", "two": "T UW", "three": "TH R IY", "four": "F AO R",
          "five": "F AA IY V", "six": "S IH K S", "seven": "S EH V AH N", "eight": "EH IY T", "nine": "N AA IY N"}


@dataclass
class Voice:
    """A synthetic speaker."""

    f0: float = 120.0
    """Mean pitch (Hz)."""
    formant_scale: float = 1.0
    """Vocal-tract length factor (1.0 male, ~1.15 female, ~1.25 child)."""
    speed: float = 1.0
    """Speaking-rate factor (durations are divided by it)."""
    breath: float = 0.02
    """Aspiration noise level."""


def sample_voice(rng: np.random.Generator) -> Voice:
    s = float(rng.uniform(0.9, 1.2))
    return Voice(f0=float(rng.uniform(90, 150) * (1 + 1.2 * (s - 0.9))), formant_scale=s,
                 speed=float(rng.uniform(0.8, 1.3)), breath=float(rng.uniform(0.005, 0.04)))


def synth_word(word: str, voice: Voice, rng: np.random.Generator) -> np.ndarray:
    """Additive formant synthesis of one digit word -> float32 waveform at 16 kHz, peak 0.9."""
    from scipy.signal import istft, stft

    if word not in _WORDS:
        raise LmlabError(f"no pronunciation for {word!r}; known: {', '.join(_WORDS)}")
    phones = ["_"] + _WORDS[word].split() + ["_"]
    durs = np.array([_PHONES[p][1] for p in phones]) / voice.speed * rng.uniform(0.85, 1.15, len(phones))
    edges = np.concatenate([[0], np.cumsum(durs)])
    n = int(edges[-1] * SR)
    t = np.arange(n) / SR
    centres = (edges[:-1] + edges[1:]) / 2
    # formant tracks: interpolate targets between phone centres (coarticulation); consonants without
    # formants borrow their neighbours'
    fm = []
    for p in phones:
        key = _PHONES[p][2]
        if isinstance(key, str):
            fm.append(_VOWELS[key])
        else:
            fm.append(None)
    for i in range(len(fm)):
        if fm[i] is None:
            nb = [fm[j] for j in (i - 1, i + 1) if 0 <= j < len(fm) and fm[j] is not None]
            fm[i] = nb[0] if nb else (500, 1500, 2500)
    fm_arr = np.array(fm, dtype=np.float64) * voice.formant_scale  # (P, 3)
    F = np.stack([np.interp(t, centres, fm_arr[:, k]) for k in range(3)])  # (3, n)
    seg = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(phones) - 1)
    kind = [_PHONES[p][0] for p in phones]
    amp = np.array([_PHONES[p][3] for p in phones])
    voiced_amp = np.where(np.isin(np.array(kind)[seg], ["v", "n", "zf"]), amp[seg], 0.0)
    voiced_amp[np.array(kind)[seg] == "zf"] = 0.3
    win = max(1, int(0.012 * SR))
    voiced_amp = np.convolve(voiced_amp, np.ones(win) / win, mode="same")
    # glottal source: f0 with declination + vibrato-ish jitter, harmonics weighted by the formant envelope
    f0 = voice.f0 * (1.1 - 0.2 * t / max(t[-1], 1e-3)) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SR  # (n,)
    bw = np.array([80.0, 110.0, 160.0])[:, None]
    gains = np.array([1.0, 0.6, 0.3])[:, None]
    y = np.zeros(n)
    kmax = int(5000 / voice.f0)
    for k in range(1, kmax + 1):
        fk = k * f0  # (n,)
        env = (gains / (1 + ((fk[None] - F) / (bw / 2)) ** 2)).sum(0) / np.sqrt(k)  # (n,)
        nasal = np.array(kind)[seg] == "n"
        env = np.where(nasal, env * 0.5 + 0.5 / (1 + ((fk - 250) / 100) ** 2), env)
        y += env * np.sin(k * phase)
    y *= voiced_amp
    # noise: fricatives, bursts, aspiration (band-shaped in the STFT domain)
    noise = rng.standard_normal(n)
    freqs, times, Z = stft(noise, fs=SR, nperseg=256, noverlap=192)
    mask = np.zeros((len(freqs), len(times)))
    for j, tt in enumerate(times):
        i = min(int(np.searchsorted(edges, tt, side="right") - 1), len(phones) - 1)
        k_, _, band, a = _PHONES[phones[max(i, 0)]]
        if k_ in ("f", "zf") and band is not None:
            mask[:, j] = a * ((freqs >= band[0] * voice.formant_scale) & (freqs <= band[1]))
        elif k_ == "stop" and band is not None:
            frac = (tt - edges[i]) / max(edges[i + 1] - edges[i], 1e-6)
            if frac > 0.6:  # closure (silence) then a short burst
                mask[:, j] = a * ((freqs >= band[0]) & (freqs <= band[1]))
        mask[:, j] += voice.breath * (voiced_amp[min(int(tt * SR), n - 1)] > 0.1)
    _, nz = istft(Z * mask, fs=SR, nperseg=256, noverlap=192)
    nz = np.pad(nz, (0, max(0, n - len(nz))))[:n]
    y = y / (np.abs(y).max() + 1e-9) + 0.6 * nz / (np.abs(nz).max() + 1e-9)
    return (0.9 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def make_speech_set(n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, Any]:
    """Spoken digits: ``n_train`` and ``n_test`` utterances per word; test voices are new voice/speed draws."""
    rng_tr, rng_te = np.random.default_rng(seed), np.random.default_rng(seed + 10_007)
    out: dict[str, Any] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, rng, n in (("train", rng_tr, n_train), ("test", rng_te, n_test)):
        for d, w in enumerate(DIGIT_WORDS):
            for _ in range(n):
                out[f"{split}_x"].append(synth_word(w, sample_voice(rng), rng))
                out[f"{split}_y"].append(d)
    out["train_y"], out["test_y"] = np.array(out["train_y"]), np.array(out["test_y"])
    return out


def check_audio(wav: Any) -> np.ndarray:
    """A mono float32 16 kHz waveform from an array or a WAV path (clear error when empty/unsupported)."""
    if isinstance(wav, (str, Path)):
        wav = read_wav(wav)
    a = np.asarray(wav, dtype=np.float32)
    if a.ndim == 2:
        a = a.mean(1) if a.shape[1] <= 8 else a.mean(0)
    if a.ndim != 1:
        raise TokenizerError(f"audio must be a 1-D waveform, got shape {tuple(a.shape)}")
    if a.size < N_FFT or not np.any(a):
        raise TokenizerError(f"empty audio: {a.size} samples (need at least {N_FFT} non-silent samples at {SR} Hz)")
    if not np.isfinite(a).all():
        raise TokenizerError("audio has NaN/inf samples")
    return a


def read_wav(path: str | Path) -> np.ndarray:
    """Read a PCM WAV (8/16/32-bit, any channels) with the stdlib; resample to 16 kHz mono."""
    import wave

    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"audio file not found: {p}")
    try:
        with wave.open(str(p), "rb") as f:
            sr, ch, width, n = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError) as e:
        raise TokenizerError(f"{p} is not a PCM WAV file ({e})") from None
    dt = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dt is None:
        raise TokenizerError(f"{p}: unsupported sample width {width} bytes")
    a = np.frombuffer(raw, dtype=dt).astype(np.float32)
    a = (a - 128) / 128 if width == 1 else a / float(np.iinfo(dt).max)
    a = a.reshape(-1, ch).mean(1) if ch > 1 else a
    if a.size == 0:
        raise TokenizerError(f"empty audio: {p} has no samples")
    if sr != SR:
        from scipy.signal import resample_poly

        g = math.gcd(sr, SR)
        a = resample_poly(a, SR // g, sr // g).astype(np.float32)
    return a


def write_wav(path: str | Path, wav: np.ndarray, sr: int = SR) -> Path:
    """16-bit PCM mono WAV via the stdlib ``wave`` module, atomically."""
    import wave

    from lmlab.core.runs import atomic_path

    a = np.clip(np.asarray(wav, dtype=np.float32), -1, 1)
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((a * 32767).astype("<i2").tobytes())
    return Path(path)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SR) -> np.ndarray:
    """Slaney-style triangular mel filters (n_mels, n_fft//2+1)."""
    def hz2mel(f):
        return 2595 * np.log10(1 + np.asarray(f) / 700)

    def mel2hz(m):
        return 700 * (10 ** (np.asarray(m) / 2595) - 1)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    pts = mel2hz(np.linspace(hz2mel(50), hz2mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
    return fb.astype(np.float32)


_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann: COLA at 50% overlap
_FB = mel_filterbank()


def _stft(x: np.ndarray) -> np.ndarray:
    pad = np.pad(x, (N_FFT // 2, N_FFT // 2))
    n = 1 + (len(pad) - N_FFT) // HOP
    frames = np.stack([pad[i * HOP: i * HOP + N_FFT] for i in range(n)])  # (T, N_FFT)
    return np.fft.rfft(frames * _WINDOW, axis=1)  # (T, F)


def _istft(S: np.ndarray, length: int) -> np.ndarray:
    frames = np.fft.irfft(S, n=N_FFT, axis=1) * _WINDOW  # (T, N_FFT)
    out = np.zeros(HOP * (len(frames) - 1) + N_FFT)
    norm = np.zeros_like(out)
    for i, fr in enumerate(frames):
        out[i * HOP: i * HOP + N_FFT] += fr
        norm[i * HOP: i * HOP + N_FFT] += _WINDOW ** 2
    out = out / np.maximum(norm, 1e-6)
    return out[N_FFT // 2: N_FFT // 2 + length]


def logmel(wav: np.ndarray) -> np.ndarray:
    """(n,) waveform -> (T, 40) log-mel frames at 50 Hz."""
    mag = np.abs(_stft(np.asarray(wav, dtype=np.float32)))  # (T, F)
    return np.log(mag @ _FB.T + 1e-3).astype(np.float32)


def griffin_lim(mag: np.ndarray, n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """Magnitude (T, F) -> waveform by Griffin-Lim phase reconstruction."""
    rng = np.random.default_rng(seed)
    length = HOP * (len(mag) - 1)
    angles = np.exp(2j * np.pi * rng.random(mag.shape))
    x = _istft(mag * angles, length)
    for _ in range(n_iter):
        S = _stft(x)[: len(mag)]
        if len(S) < len(mag):
            S = np.pad(S, ((0, len(mag) - len(S)), (0, 0)))
        angles = np.exp(1j * np.angle(S))
        x = _istft(mag * angles, length)
    return (0.9 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


class KMeansSpeechTokenizer:
    """``kmeans-logmel``: waveform <-> one k-means unit per 20 ms log-mel frame."""

    modality = "speech"

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.asarray(centroids, dtype=np.float32)  # (K, 40)
        self.codebook_size = len(self.centroids)
        self.tokens_per_second = SR / HOP
        self._pinv = np.linalg.pinv(_FB)

    @classmethod
    def fit(cls, wavs: list[np.ndarray], k: int = 64, seed: int = 0) -> KMeansSpeechTokenizer:
        from sklearn.cluster import KMeans

        frames = np.concatenate([logmel(check_audio(w)) for w in wavs])
        if len(frames) < k:
            raise LmlabError(f"k-means needs at least {k} frames, got {len(frames)}")
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(frames)
        return cls(km.cluster_centers_)

    def encode(self, wav: Any) -> list[int]:
        f = logmel(check_audio(wav))  # (T, 40)
        d = (f ** 2).sum(1, keepdims=True) - 2 * f @ self.centroids.T + (self.centroids ** 2).sum(1)[None]
        return d.argmin(1).tolist()

    def decode_logmel(self, ids: list[int]) -> np.ndarray:
        ids = list(ids)
        if not ids:
            raise TokenizerError("empty speech token sequence: nothing to decode")
        if not all(0 <= i < self.codebook_size for i in ids):
            raise TokenizerError(f"speech codes must lie in [0, {self.codebook_size})")
        return self.centroids[ids]

    def decode(self, ids: list[int], n_iter: int = 32) -> np.ndarray:
        mel = np.exp(self.decode_logmel(ids)) - 1e-3  # (T, 40)
        mag = np.clip(mel @ self._pinv.T, 0, None)  # (T, F)
        return griffin_lim(mag, n_iter)

    def save(self, path: str | Path) -> Path:
        from lmlab.core.runs import save_tensors

        return save_tensors(Path(path), {"centroids": torch.from_numpy(self.centroids)},
                            {"kind": "kmeans-logmel", "codebook_size": self.codebook_size, "sr": SR, "hop": HOP})

    @classmethod
    def load(cls, path: str | Path) -> KMeansSpeechTokenizer:
        from safetensors.torch import load_file

        return cls(load_file(str(path))["centroids"].numpy())


# ----------------------------------------------------------------------------------------------------
# independent judges (linear classifiers; weights stored as safetensors)


class LinearJudge:
    """Multinomial logistic regression over fixed features: the 'independent classifier' of the benchmark."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, std: np.ndarray, kind: str):
        self.coef, self.intercept, self.mean, self.std, self.kind = coef, intercept, mean, std, kind

    @staticmethod
    def features(kind: str, items: list[Any]) -> np.ndarray:
        if kind == "image":
            return np.stack([np.asarray(x, np.float32).reshape(-1) for x in items])
        return np.stack([speech_features(w) for w in items])

    @classmethod
    def fit(cls, kind: str, items: list[Any], labels: np.ndarray, c: float = 1.0) -> LinearJudge:
        from sklearn.linear_model import LogisticRegression

        x = cls.features(kind, items)
        mean, std = x.mean(0), x.std(0) + 1e-6
        lr = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / std, labels)
        return cls(lr.coef_, lr.intercept_, mean, std, kind)

    def predict(self, items: list[Any]) -> np.ndarray:
        x = (self.features(self.kind, items) - self.mean) / self.std
        return (x @ self.coef.T + self.intercept).argmax(1)

    def save(self, path: str | Path) -> Path:
        from lmlab.core.runs import save_tensors

        t = {k: torch.from_numpy(np.asarray(getattr(self, k), np.float32)) for k in ("coef", "intercept", "mean",
                                                                                     "std")}
        return save_tensors(Path(path), t, {"kind": self.kind})

    @classmethod
    def load(cls, path: str | Path) -> LinearJudge:
        from safetensors.torch import load_file

        t = {k: v.numpy() for k, v in load_file(str(path)).items()}
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        return cls(t["coef"], t["intercept"], t["mean"], t["std"], meta.get("kind", "image"))


def speech_features(wav: np.ndarray, frames: int = 24) -> np.ndarray:
    """Log-mel resampled to ``frames`` frames, flattened (frames*40,)."""
    f = logmel(check_audio(wav))  # (T, 40)
    idx = np.linspace(0, len(f) - 1, frames)
    out = np.stack([np.interp(idx, np.arange(len(f)), f[:, j]) for j in range(f.shape[1])], 1)
    return out.reshape(-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# adapters for public tokenizers (lazy; tested only where weights exist)


class EncodecAdapter:
    """Music/audio through transformers' ``EncodecModel`` (AnyGPT: facebook/encodec_32khz, 4 x 2048 codes).

    Codes of the ``n_q`` codebooks are interleaved frame by frame with offset ``q * codebook_size``, as AnyGPT
    does, so one LM vocabulary of ``n_q * codebook_size`` tokens covers them."""

    modality = "music"

    def __init__(self, name: str = "facebook/encodec_32khz", device: str = "cpu"):
        try:
            from transformers import AutoProcessor, EncodecModel
        except ImportError:
            raise TokenizerError("encodec needs transformers with EncodecModel") from None
        try:
            self.model = EncodecModel.from_pretrained(name).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(name)
        except OSError as e:
            raise TokenizerError(f"cannot load Encodec {name!r} (not in the local HF cache and offline?): "
                                 f"{str(e).splitlines()[0]}") from None
        self.device = device
        self.n_q = int(self.model.config.num_codebooks if hasattr(self.model.config, "num_codebooks") else 4)
        self.base_size = int(self.model.config.codebook_size)
        self.codebook_size = self.n_q * self.base_size
        self.sr = int(self.processor.sampling_rate)

    def encode(self, wav: Any) -> list[int]:
        a = check_audio(wav)
        inp = self.processor(raw_audio=a, sampling_rate=self.sr, return_tensors="pt").to(self.device)
        with torch.no_grad():
            codes = self.model.encode(inp["input_values"], inp.get("padding_mask")).audio_codes  # (1, 1, n_q, T)
        c = codes[0, 0]  # (n_q, T)
        off = torch.arange(c.shape[0], device=c.device)[:, None] * self.base_size
        return (c + off).T.reshape(-1).tolist()  # frame-interleaved

    def decode(self, ids: list[int]) -> np.ndarray:
        ids = list(ids)[: len(ids) // self.n_q * self.n_q]
        if not ids:
            raise TokenizerError("empty Encodec token sequence")
        c = torch.tensor(ids, device=self.device).reshape(-1, self.n_q).T % self.base_size  # (n_q, T)
        with torch.no_grad():
            audio = self.model.decode(c[None, None], [None])[0]
        return audio[0, 0].float().cpu().numpy()


class SpeechTokenizerAdapter:
    """AnyGPT's speech tokenizer: the ``speechtokenizer`` package (fnlp/AnyGPT-speech-modules); RVQ-1 only."""

    modality = "speech"

    def __init__(self, config: str, ckpt: str, device: str = "cpu"):
        try:
            from speechtokenizer import SpeechTokenizer  # type: ignore[import-not-found]
        except ImportError:
            raise TokenizerError("speechtokenizer adapter needs `pip install speechtokenizer==0.1.2` and the "
                                 "fnlp/AnyGPT-speech-modules weights") from None
        for p in (config, ckpt):
            if not Path(p).is_file():
                raise TokenizerError(f"speechtokenizer file not found: {p}")
        self.model = SpeechTokenizer.load_from_checkpoint(config, ckpt).to(device).eval()
        self.device, self.codebook_size, self.sr = device, 1024, int(self.model.sample_rate)

    def encode(self, wav: Any) -> list[int]:
        a = torch.from_numpy(check_audio(wav))[None, None].to(self.device)
        with torch.no_grad():
            codes = self.model.encode(a)  # (n_q, B, T)
        return codes[0, 0].tolist()

    def decode(self, ids: list[int]) -> np.ndarray:
        raise TokenizerError("RVQ-1 alone cannot be vocoded: AnyGPT fills RVQ-2..8 with its SoundStorm model; "
                             "load it from fnlp/AnyGPT-speech-modules (not bundled)")


class Seed2Adapter:
    """SEED-tokenizer-2 (AILab-CVC/seed-tokenizer-2): 224x224 -> 32 ids of 8192; needs the SEED code."""

    modality = "image"

    def __init__(self, ckpt: str, device: str = "cpu"):
        try:
            from seed2.seed_qformer.qformer_quantizer import Blip2QformerQuantizer  # type: ignore
        except ImportError:
            raise TokenizerError("seed2 adapter needs the SEED-2 code from OpenMOSS/AnyGPT (seed2/) on "
                                 "PYTHONPATH and AILab-CVC/seed-tokenizer-2/seed_quantizer.pt") from None
        if not Path(ckpt).is_file():
            raise TokenizerError(f"SEED quantizer checkpoint not found: {ckpt}")
        self.model = Blip2QformerQuantizer.from_pretrained(pretrained_model_path=ckpt, vit_precision="fp16"
                                                           if device != "cpu" else "fp32").to(device).eval()
        self.device, self.codebook_size, self.tokens_per_item = device, 8192, 32

    def encode(self, img: Any) -> list[int]:
        from PIL import Image

        im = Image.open(img).convert("RGB") if isinstance(img, (str, Path)) else img
        a = np.asarray(im.resize((224, 224)), dtype=np.float32) / 255.0
        mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
        x = torch.from_numpy(((a - mean) / std).transpose(2, 0, 1)).float()[None].to(self.device)
        with torch.no_grad():
            return self.model.get_codebook_indices(x)[0].tolist()

    def decode(self, ids: list[int]) -> Any:
        raise TokenizerError("SEED-2 decoding needs diffusers' stabilityai/stable-diffusion-2-1-unclip pipeline "
                             "(not bundled)")


ADAPTERS: dict[str, Any] = {"encodec": EncodecAdapter, "speechtokenizer": SpeechTokenizerAdapter,
                            "seed2": Seed2Adapter}
"""Public tokenizers AnyGPT uses: name -> adapter class."""
BUILTIN: dict[str, Any] = {"vqvae-digits": VQImageTokenizer, "kmeans-logmel": KMeansSpeechTokenizer}
"""Tokenizers lmlab trains itself: name -> class with ``load(path)``."""
