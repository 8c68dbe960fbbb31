"""Real speech for the silero-vad models: espeak-ng's voice (a synthesized one where it is not installed),
cut into the frames silero-vad's own wrapper feeds, with the stacked sample layout where an input has no
batch axis first (tests/zoo/inputs.py says why, and holds the shared helpers and every other model's inputs)."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from tests.zoo.corpus import ZooModel
from tests.zoo.inputs import N_CALIBRATION, N_EVALUATION, Sets, text_lines

SAMPLE_RATE = 16000
FRAME, CONTEXT = 512, 64  # silero-vad at 16 kHz: 512 new samples per call, 64 of the previous as context


def _espeak(text: str, voice: str, speed: int) -> np.ndarray | None:
    """espeak-ng's voice for text, 16 kHz float32 in [-1, 1]; None without espeak-ng."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        return None
    done = subprocess.run([binary, "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True,
                          timeout=120, check=True)
    with wave.open(io.BytesIO(done.stdout)) as wav:
        rate, raw = wav.getframerate(), wav.readframes(wav.getnframes())
    from scipy.signal import resample_poly

    audio = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    return resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32)


def _synthetic_voice(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A speech-like signal where espeak-ng is missing: voiced syllables (a 90-220 Hz pulse train through
    three vowel formants) in words and phrases, with pauses between them."""
    from scipy.signal import lfilter

    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]
    out: list[np.ndarray] = []
    total = 0
    while total < seconds * SAMPLE_RATE:
        for _ in range(int(rng.integers(2, 7))):  # a phrase of words
            for _ in range(int(rng.integers(1, 4))):  # a word of syllables
                n = int(rng.uniform(0.12, 0.3) * SAMPLE_RATE)
                f0 = rng.uniform(90, 220)
                pulses = (np.arange(n) % int(SAMPLE_RATE / f0) == 0).astype(np.float32)
                voiced = pulses
                for formant in vowels[int(rng.integers(len(vowels)))]:
                    r, theta = 0.97, 2 * np.pi * formant / SAMPLE_RATE
                    voiced = lfilter([1.0], [1.0, -2 * r * np.cos(theta), r * r], voiced)
                envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.5
                out.append((voiced * envelope).astype(np.float32))
            out.append(np.zeros(int(rng.uniform(0.04, 0.15) * SAMPLE_RATE), np.float32))
        out.append(np.zeros(int(rng.uniform(0.4, 1.2) * SAMPLE_RATE), np.float32))
        total = sum(len(o) for o in out)
    audio = np.concatenate(out)
    return (0.3 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def speech(seed: int, voice: str) -> tuple[np.ndarray, str]:
    """~12 s of 16 kHz speech with pauses and a little noise, and where it came from."""
    rng = np.random.default_rng(seed)
    lines = text_lines()
    pieces: list[np.ndarray] = [np.zeros(int(0.6 * SAMPLE_RATE), np.float32)]
    source = f"espeak-ng voice {voice}"
    for _ in range(4):
        said = _espeak(" ".join(lines[int(rng.integers(len(lines)))] for _ in range(2)), voice,
                       int(rng.integers(140, 180)))
        if said is None:
            source = "synthesized voice (espeak-ng not installed)"
            pieces = [_synthetic_voice(rng, 12.0)]
            break
        pieces += [0.8 * said / (np.abs(said).max() + 1e-9), np.zeros(int(rng.uniform(0.5, 1.5) * SAMPLE_RATE))]
    audio = np.concatenate(pieces).astype(np.float32)
    audio += rng.normal(0, 0.003, size=audio.shape).astype(np.float32)
    return audio, source


def frames_with_context(audio: np.ndarray) -> np.ndarray:
    """[n, 576]: each 512-sample frame after the previous frame's last 64 samples (zeros first), as
    silero_vad's OnnxWrapper.__call__ and sequence_vad.frame_blocks build them."""
    n = len(audio) // FRAME
    frames = audio[: n * FRAME].reshape(n, FRAME)
    context = np.vstack([np.zeros((1, CONTEXT), np.float32), frames[:-1, -CONTEXT:]])
    return np.hstack([context, frames]).astype(np.float32)


def _pick(probabilities: np.ndarray, count: int) -> np.ndarray:
    """count frame indices, half where the float model hears speech and half where it does not."""
    speech_idx, quiet_idx = np.flatnonzero(probabilities >= 0.5), np.flatnonzero(probabilities < 0.5)
    half = min(count // 2, len(speech_idx))
    take = [speech_idx[np.linspace(0, len(speech_idx) - 1, half).astype(int)]] if half else []
    take.append(quiet_idx[np.linspace(0, len(quiet_idx) - 1, count - half).astype(int)])
    return np.sort(np.concatenate(take))


def _session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def silero_onnx_inputs(model: ZooModel, path: Path) -> Sets:
    """silero_vad 6.2.3 OnnxWrapper.__call__: input [1, 576] (context + frame), state [2, 1, 128] carried
    from the previous call, sr = 16000 as a 0-d int64. Frames from a streaming run of the float model."""
    session = _session(path)
    sets, sources = [], []
    for seed, voice, count in ((21, "en", N_CALIBRATION), (22, "en-us", N_EVALUATION)):
        audio, source = speech(seed, voice)
        sources.append(source)
        frames = frames_with_context(audio)
        state = np.zeros((2, 1, 128), np.float32)
        states, probabilities = [], []
        for frame in frames:
            states.append(state)
            probability, state = session.run(None, {"input": frame[None], "state": state,
                                                    "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
            probabilities.append(float(probability.reshape(-1)[0]))
        idx = _pick(np.asarray(probabilities), count)
        sets.append({"input": frames[idx], "state": np.stack(states)[idx],
                     "sr": np.full(len(idx), SAMPLE_RATE, dtype=np.int64)})
    return Sets(sets[0], sets[1], {"source": sources, "layout": "input [n, 576] by batch; state [n, 2, 1, 128] "
                                   "and sr [n] stacked (sample i is state[i], sr[i])"})


def silero_sequence_inputs(model: ZooModel, path: Path) -> Sets:
    """silero_vad 6.2.3 SileroVADSequence.audio_forward: frames [n, 576] and h, c [1, 1, 128] from the call
    before; here one frame per sample, with the state a streaming run of the float model reached there."""
    session = _session(path)
    sets, sources = [], []
    for seed, voice, count in ((23, "en", N_CALIBRATION), (24, "en-us", N_EVALUATION)):
        audio, source = speech(seed, voice)
        sources.append(source)
        frames = frames_with_context(audio)
        h = c = np.zeros((1, 1, 128), np.float32)
        hs, cs, probabilities = [], [], []
        for frame in frames:
            hs.append(h)
            cs.append(c)
            probability, h, c = session.run(None, {"input": frame[None], "h": h, "c": c})
            probabilities.append(float(probability.reshape(-1)[0]))
        idx = _pick(np.asarray(probabilities), count)
        sets.append({"input": frames[idx], "h": np.concatenate(hs)[idx], "c": np.concatenate(cs)[idx]})
    return Sets(sets[0], sets[1], {"source": sources, "layout": "input [n, 576], h and c [n, 1, 128] by batch"})


def silero_jit_inputs(model: ZooModel, path: Path) -> Sets:
    """silero_vad 6.2.3 VADRNNJITMerge.forward(x [1, 512], sr: int): the module keeps its own state and
    context, so samples are consecutive frames (a window around a speech onset), fed in order."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    sets, sources = [], []
    for seed, voice, count in ((25, "en", N_CALIBRATION), (26, "en-us", N_EVALUATION)):
        audio, source = speech(seed, voice)
        sources.append(source)
        frames = frames_with_context(audio)[:, CONTEXT:]
        module.reset_states()
        with torch.no_grad():
            probabilities = np.asarray([float(module(torch.from_numpy(f[None].copy()), SAMPLE_RATE))
                                        for f in frames])
        onsets = np.flatnonzero((probabilities[1:] >= 0.5) & (probabilities[:-1] < 0.5)) + 1
        start = int(max(0, (onsets[0] if len(onsets) else len(frames) // 2) - count // 3))
        window = frames[start : start + count]
        sets.append({"x": window, "sr": np.full(len(window), SAMPLE_RATE, dtype=np.int64)})
    return Sets(sets[0], sets[1], {"source": sources, "layout": "x [n, 512] by batch, sr [n] stacked (an int)"})
