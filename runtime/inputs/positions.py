"""Qwen2.5-VL position math in numpy, reproducing transformers 5.23:

- the vision tower's per-patch 2D rotary positions, attention segments and window permutation
  (`transformers.vision_utils.get_vision_position_ids / get_vision_cu_seqlens / get_vision_window_index`);
- the decoder's 3D M-RoPE positions (`Qwen2_5_VLModel.get_rope_index`) and their continuation while decoding.

These are data-dependent (loops, ragged grids), so an exported graph takes them as inputs instead of computing
them. No torch: this runs on the device.
"""

from __future__ import annotations

import numpy as np

from retrv.runtime.errors import InputError

# transformers pads the per-image window grid with this id and drops it again; any negative value would do.
_WINDOW_PAD = -100


def _as_grid(grid_thw, name: str = "grid_thw") -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim == 1 and grid.shape == (3,):
        grid = grid[None]  # one image given as (3,) as preprocess_image returns it
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise InputError(
            f"{name}: got {grid.dtype} array of shape {grid.shape}; expected integer (n, 3) rows of (t, h, w)"
        )
    if grid.size and grid.min() < 1:
        raise InputError(f"{name}: got a row with {grid.min()}; expected every t, h, w >= 1")
    return grid.astype(np.int64)


def _check_merge(grid: np.ndarray, merge_size: int, name: str = "grid_thw") -> None:
    if isinstance(merge_size, bool) or not isinstance(merge_size, (int, np.integer)) or merge_size < 1:
        raise InputError(f"merge_size: got {merge_size!r}; expected a positive integer")
    bad = grid[(grid[:, 1] % merge_size != 0) | (grid[:, 2] % merge_size != 0)]
    if len(bad):
        raise InputError(
            f"{name} row {bad[0].tolist()}: expected h and w to be multiples of merge_size={merge_size}"
        )


def vision_position_ids(grid_thw, merge_size: int) -> np.ndarray:
    """(h, w) patch coordinates of every patch, int64 (N, 2), in the patch order of the preprocessed pixels:
    merge blocks row-major, patches inside a block row-major, the frame repeated t times."""
    grid = _as_grid(grid_thw)
    _check_merge(grid, merge_size)
    m = int(merge_size)
    out = []
    for t, h, w in grid.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # (h*w,) merge-block-major
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))  # (t*h*w, 2)
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(out, axis=0).astype(np.int64)


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    """Cumulative patch counts, int32 (n_frames + 1,): each frame of each image is one full-attention segment."""
    grid = _as_grid(grid_thw)
    seqlens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # (n_frames,)
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def vision_window_index(grid_thw, merge_size: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Window attention layout of Qwen2.5-VL's vision tower.

    Returns (window_index int64 (N / merge^2,), cu_window_seqlens int32): the permutation of merge blocks that puts
    each window's blocks next to each other, and the cumulative window lengths in patches. As in transformers, a
    side that is already a multiple of the window gets a whole padded window row/column, whose empty windows are
    then removed by de-duplicating consecutive boundaries (torch.unique_consecutive)."""
    grid = _as_grid(grid_thw)
    _check_merge(grid, merge_size)
    for name, value in (("window_size", window_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name}: got {value!r}; expected a positive integer")
    m = int(merge_size)
    win = int(window_size) // m // int(patch_size)  # window side in merge blocks
    if win < 1:
        raise InputError(
            f"window_size: got {window_size}; expected at least merge_size*patch_size={m * int(patch_size)}"
        )
    merge_unit = m * m
    window_index = []
    cu = [0]
    offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h = win - lh % win  # equals win (never 0) when lh is a multiple: the quirk described above
        pad_w = win - lw % win
        nwh, nww = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=_WINDOW_PAD)
        padded = padded.reshape(t, nwh, win, nww, win).transpose(0, 1, 3, 2, 4)  # (t, nwh, nww, win, win)
        padded = padded.reshape(t, nwh * nww, win, win)
        seqlens = (padded != _WINDOW_PAD).sum(axis=(2, 3)).reshape(-1)  # (t*nwh*nww,) blocks per window
        flat = padded.reshape(-1)
        window_index.append(flat[flat != _WINDOW_PAD] + offset)
        cu.extend((np.cumsum(seqlens) * merge_unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # unique_consecutive
    index_arr = np.concatenate(window_index) if window_index else np.zeros((0,), dtype=np.int64)
    return index_arr.astype(np.int64), cu_arr[keep]


def segment_ids_from_cu_seqlens(cu_seqlens, total: int) -> np.ndarray:
    """Segment number of each of `total` positions, int64 (total,): i where cu_seqlens[i] <= pos < cu_seqlens[i+1].
    Two positions may attend each other iff their segment ids are equal, which a graph can test with one broadcast
    compare instead of a loop over cu_seqlens."""
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 1 or not np.issubdtype(cu.dtype, np.integer):
        raise InputError(f"cu_seqlens: got {cu.dtype} array of shape {cu.shape}; expected a 1-D integer array")
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        raise InputError(
            f"cu_seqlens: got {cu.tolist() if cu.size <= 8 else f'[{cu[0]}, ..., {cu[-1]}]'}; expected non-decreasing "
            f"from 0 to total={total}"
        )
    # side="right" skips empty segments (repeated boundaries): a position belongs to the last segment starting at or
    # before it.
    return (np.searchsorted(cu, np.arange(total), side="right") - 1).astype(np.int64)


def _runs(is_image: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values: (value, start, end)."""
    if is_image.size == 0:
        return []
    edges = np.flatnonzero(is_image[1:] != is_image[:-1]) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [is_image.size]])
    return [(bool(is_image[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(
    input_ids,
    image_grid_thw=None,
    attention_mask=None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    pad_position: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """3D M-RoPE positions of a prompt batch, as transformers 5.23's `Qwen2_5_VLModel.get_rope_index` with
    `mm_token_type_ids = (input_ids == image_token_id)`.

    Text tokens count up by one on all three rows. An image run starts at the current position p and takes
    (p + t_index, p + h_index, p + w_index) over its merged (t, h/m, w/m) grid; the next token continues at
    p + max(h, w)/m. Padding (attention_mask == 0) is skipped when counting and gets `pad_position`.

    Returns (position_ids int64 (3, B, S), rope_deltas int64 (B, 1)); rope_deltas = max position + 1 minus the
    number of unpadded tokens of the row (0 for a row without images).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids: got {ids.dtype} array of shape {ids.shape}; expected integer (batch, seq)")
    batch, seq = ids.shape
    if attention_mask is None:
        mask = np.ones((batch, seq), dtype=bool)
    else:
        mask_arr = np.asarray(attention_mask)
        if mask_arr.shape != ids.shape:
            raise InputError(f"attention_mask: got shape {mask_arr.shape}; expected input_ids' shape {ids.shape}")
        if not np.isin(mask_arr, (0, 1)).all():
            raise InputError(f"attention_mask: got values {np.unique(mask_arr)[:5].tolist()}; expected only 0 and 1")
        mask = mask_arr.astype(bool)
    grid = np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else _as_grid(image_grid_thw, "image_grid_thw")
    _check_merge(grid, spatial_merge_size, "image_grid_thw")
    m = int(spatial_merge_size)

    rows = [(b, _runs(ids[b][mask[b]] == image_token_id)) for b in range(batch)]
    n_runs = sum(is_img for _, runs in rows for is_img, _, _ in runs)
    if n_runs != len(grid):
        raise InputError(
            f"image_grid_thw: got {len(grid)} rows; expected one per image-token run in input_ids "
            f"(found {n_runs} runs of image_token_id={image_token_id})"
        )

    position_ids = np.full((3, batch, seq), pad_position, dtype=np.int64)
    rope_deltas = np.zeros((batch, 1), dtype=np.int64)
    next_image = 0
    for b, runs in rows:
        n_tokens = int(mask[b].sum())
        if n_tokens == 0:
            continue  # an all-padding row has no positions to give (transformers fails on it)
        row = np.empty((3, n_tokens), dtype=np.int64)
        current = 0
        for is_image, start, end in runs:
            if not is_image:
                row[:, start:end] = np.arange(current, current + end - start)  # broadcast over the 3 rows
                current += end - start
                continue
            t, h, w = grid[next_image].tolist()
            expected = t * h * w // (m * m)
            if end - start != expected:
                raise InputError(
                    f"input_ids row {b}: image {next_image} has {end - start} image tokens; expected "
                    f"t*h*w/merge^2 = {t}*{h}*{w}/{m * m} = {expected} from image_grid_thw {[t, h, w]}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            row[:, start:end] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current  # (3, run)
            current += max(h, w) // m  # transformers 5 skips by the larger side only, never by t
            next_image += 1
        position_ids[:, b, mask[b]] = row
        rope_deltas[b, 0] = row.max() + 1 - n_tokens
    return position_ids, rope_deltas


def decode_position_ids(rope_deltas, start, length: int) -> np.ndarray:
    """Positions of `length` tokens appended after `start` cached tokens, int64 (3, B, length):
    arange(start, start + length) + rope_deltas on all three rows.

    `start` is an int, or an int array (B,) of per-row counts. rope_deltas from `rope_index` are relative to the
    row's unpadded length (transformers 5), so with a left-padded batch pass the unpadded counts,
    `attention_mask.sum(-1)`, not the padded cache length."""
    deltas = np.asarray(rope_deltas)
    if deltas.ndim != 2 or deltas.shape[1] != 1 or not np.issubdtype(deltas.dtype, np.integer):
        raise InputError(f"rope_deltas: got {deltas.dtype} array of shape {deltas.shape}; expected integer (batch, 1)")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise InputError(f"length: got {length!r}; expected an integer >= 0")
    starts = np.asarray(start)
    if not np.issubdtype(starts.dtype, np.integer) or starts.ndim > 1 or (
        starts.ndim == 1 and starts.shape != (deltas.shape[0],)
    ):
        raise InputError(
            f"start: got {starts.dtype} of shape {starts.shape}; "
            f"expected an int or an integer array ({deltas.shape[0]},)"
        )
    if starts.size and starts.min() < 0:
        raise InputError(f"start: got {starts.min()}; expected >= 0")
    starts = np.broadcast_to(starts.astype(np.int64), (deltas.shape[0],))[:, None]  # (B, 1)
    positions = starts + np.arange(length, dtype=np.int64)[None, :] + deltas.astype(np.int64)  # (B, length)
    return np.repeat(positions[None], 3, axis=0)  # (3, B, length)


def vision_graph_inputs(grid_thw, merge_size: int, window_size: int, patch_size: int) -> dict[str, np.ndarray]:
    """Every grid-dependent input of the vision graph (besides the patches), as the exported `vision.onnx` and
    `retrv.model.vision.VisionTower.forward` take them. int64 throughout."""
    grid = _as_grid(grid_thw)
    total = int(grid.prod(axis=1).sum())
    window_index, cu_window = vision_window_index(grid, merge_size, window_size, patch_size)
    return {
        "position_ids": vision_position_ids(grid, merge_size),  # (N, 2)
        "window_index": window_index,  # (N/m^2,)
        "reverse_index": np.argsort(window_index, kind="stable").astype(np.int64),  # undoes the window order
        "window_segments": segment_ids_from_cu_seqlens(cu_window, total),  # (N,)
        "image_segments": segment_ids_from_cu_seqlens(vision_cu_seqlens(grid), total),  # (N,)
    }
