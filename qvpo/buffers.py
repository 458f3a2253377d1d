"""Replay buffer for the off-policy agents.

Transitions are stored as float32 tensors on the training device, so a minibatch is an index
gather with no host-to-device copy. `terminal` is the flag the critic target uses:
1 only when the episode *terminated* (a time-limit truncation bootstraps; see train.py).

Layout (Dopamine-style): every observation is stored once, in one ring `obs`. The transition that
starts in slot i has its next observation in slot i + 1 (mod the ring size). While an episode runs,
the next add()'s obs is bit-for-bit the previous next_obs, so it is not written again. When an add()
starts a new episode (its obs differs from the pending next_obs), the ring skips one slot: the last
transition's real final next observation keeps its own slot, which starts no transition. A slot
starts a sampleable transition only while both its row and its next row still hold that
transition's data; overwriting the oldest rows withdraws the transitions that used them.

Improved actions (DIPO's "diffusion buffer", opt-in): `track_improved_actions()` adds one more
column, an action per transition start slot that add() initialises to the transition's own action
and `write_improved()` overwrites. DIPO's reference keeps a second (s, a) ring appended at every env
step next to the replay ring; it holds the same states in the same order, so here it is a column
of A floats per slot instead of a second copy of every observation. A buffer that never calls it
allocates nothing for it and behaves as before.
"""

from __future__ import annotations

from typing import NamedTuple

import gin
import numpy as np
import torch

from qvpo.errors import require_int
from qvpo.rng import BUFFER_STREAM


class Batch(NamedTuple):
    obs: torch.Tensor          # (B, S)
    action: torch.Tensor       # (B, A), in [-1, 1]
    reward: torch.Tensor       # (B,)
    next_obs: torch.Tensor     # (B, S): the real next observation, also on truncation
    terminal: torch.Tensor     # (B,) 1.0 where the episode terminated (no bootstrap)


def _host_rows(x, width: int) -> np.ndarray:
    """`x` (array, list or tensor on any device) as a C-contiguous float32 host array (..., width)."""
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, width)


def _host_vector(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


@gin.configurable
class ReplayBuffer:
    """Circular FIFO buffer of transitions, each observation stored once.

    Args:
      capacity: transitions kept (the paper's 1,000,000: docs/paper-notes.md#training-protocol).
        The observation ring has capacity + 1 rows,
        so one unbroken episode stream keeps exactly `capacity` transitions; every episode end
        inside the window costs one extra row (its final next observation), so a stream with
        episode ends keeps `capacity` minus (episode ends in the window) transitions.

    `sample` draws uniformly among the sampleable transitions with `self.generator` (seeded by
    `seed`), on the buffer's device, with no host synchronisation.
    """

    def __init__(self, obs_dim: int, action_dim: int, capacity: int = 1_000_000,
                 device: torch.device | str = "cpu"):
        require_int(capacity, "ReplayBuffer.capacity", 1)
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.slots = slots = self.capacity + 1
        # Uninitialised on purpose: only rows of stored transitions are ever read, and the pages
        # of a large host buffer are committed as it fills rather than all at construction.
        f32 = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.empty(slots, self.obs_dim, **f32)       # observation ring
        self.action = torch.empty(slots, self.action_dim, **f32)  # per transition start slot
        self.reward = torch.empty(slots, **f32)
        self.terminal = torch.empty(slots, **f32)
        # The sampleable start slots, as a dense list (first `_n` entries) with an inverse map
        # slot -> position (-1: not sampleable); add/remove are O(1) (removal swaps in the last).
        small = slots < 2**31 - 1
        self._starts = torch.empty(slots, dtype=torch.int64, device=self.device)  # ready to index
        self._on_cpu = self.device.type == "cpu"
        if self._on_cpu:  # the host list *is* the sampled tensor: no mirror to keep in sync
            self._list = self._starts.numpy()
            self._np = (self.obs.numpy(), self.action.numpy(), self.reward.numpy(), self.terminal.numpy())
        else:
            self._list = np.empty(slots, dtype=np.int64)
            self._np = None
        self._pos = np.full(slots, -1, dtype=np.int32 if small else np.int64)
        self._added = np.full(slots, -1, dtype=np.int64)  # slot -> add() index of its transition
        self._n = 0
        self._dirty: list[int] = []    # list positions the device mirror lacks (not on CPU)
        self._dirty_all = False
        self._cursor = 0               # slot of the pending next observation (or of the first obs)
        self._pending: np.ndarray | None = None  # host copy of the last next_obs; None: empty
        self.num_added = 0             # add() calls so far (transitions ever added)
        self.generator = torch.Generator(device=self.device)
        self.improved: torch.Tensor | None = None  # improved-action column (track_improved_actions)
        self._improved_np: np.ndarray | None = None

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ bookkeeping
    def _mark_dirty(self, p: int) -> None:
        if self._on_cpu or self._dirty_all:
            return
        self._dirty.append(p)
        if len(self._dirty) > 65_536:  # a long fill without sampling: resend the whole list once
            self._dirty_all, self._dirty = True, []

    def _validate(self, slot: int, add_index: int) -> None:
        n = self._n
        self._list[n] = slot
        self._pos[slot] = n
        self._added[slot] = add_index
        self._n = n + 1
        self._mark_dirty(n)

    def _invalidate(self, slot: int) -> None:
        p = int(self._pos[slot])
        if p < 0:
            return
        last = int(self._list[self._n - 1])
        self._list[p] = last
        self._pos[last] = p
        self._pos[slot] = -1
        self._added[slot] = -1
        self._n -= 1
        self._mark_dirty(p)

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor; on CUDA through pinned memory, without a host sync."""
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _flush(self) -> None:
        """Bring the device copy of the start list up to date (one host-to-device copy)."""
        if self._dirty_all:
            n = self._n
            self._starts[:n] = self._upload(np.ascontiguousarray(self._list[:n]))
        elif self._dirty:
            p = np.asarray(self._dirty, dtype=np.int64)  # repeats carry the same value: harmless
            d = self._upload(np.concatenate([p, self._list[p]]))
            self._starts.index_copy_(0, d[:len(p)], d[len(p):])
        self._dirty, self._dirty_all = [], False

    def _claim(self, obs_row: np.ndarray) -> tuple[int, bool]:
        """Slot for a transition starting at `obs_row`, and whether the row must be written."""
        if self._pending is None:
            return self._cursor, True
        if obs_row.tobytes() == self._pending.tobytes():  # the episode goes on: row already there
            return self._cursor, False
        return (self._cursor + 1) % self.slots, True      # new episode: keep the final next obs

    # ------------------------------------------------------------------ adding
    def add(self, obs, action, reward: float, next_obs, terminal: bool) -> None:
        """Store one transition; called once per env step, in order (see train.py)."""
        o = _host_rows(obs, self.obs_dim)[0]
        no = _host_rows(next_obs, self.obs_dim)[0].copy()
        a = _host_rows(action, self.action_dim)[0]
        i, write_obs = self._claim(o)
        j = (i + 1) % self.slots
        self._invalidate(i)  # an old transition in slot i loses its row,
        self._invalidate(j)  # one in slot j its row (slot j now holds this one's next obs)
        if self._np is not None:
            obs_np, act_np, rew_np, term_np = self._np
            if write_obs:
                obs_np[i] = o
            act_np[i] = a
            if self._improved_np is not None:
                self._improved_np[i] = a  # a new transition starts from its own action
            rew_np[i] = float(reward)
            term_np[i] = float(terminal)
            obs_np[j] = no
        else:  # one host-to-device copy of the packed row, then device-side writes
            S, A = self.obs_dim, self.action_dim
            row = np.empty(2 * S + A + 2, dtype=np.float32)
            row[:S], row[S:2 * S], row[2 * S:2 * S + A] = no, o, a
            row[-2], row[-1] = float(reward), float(terminal)
            d = self._upload(row)
            self.obs[j] = d[:S]
            if write_obs:
                self.obs[i] = d[S:2 * S]
            self.action[i] = d[2 * S:2 * S + A]
            if self.improved is not None:
                self.improved[i] = d[2 * S:2 * S + A]
            self.reward[i] = d[-2]
            self.terminal[i] = d[-1]
        self._validate(i, self.num_added)
        self.num_added += 1
        self._cursor, self._pending = j, no

    def add_batch(self, obs, action, reward, next_obs, terminal) -> None:
        """Store N consecutive transitions (rows in env-step order); same result as N add() calls."""
        O, NO = _host_rows(obs, self.obs_dim), _host_rows(next_obs, self.obs_dim)
        A = _host_rows(action, self.action_dim)
        r, t = _host_vector(reward), _host_vector(terminal)
        N = len(O)
        if not (len(NO) == len(A) == len(r) == len(t) == N):
            raise ValueError(f"add_batch: row counts differ: obs {len(O)}, action {len(A)}, "
                             f"reward {len(r)}, next_obs {len(NO)}, terminal {len(t)}")
        chunk = max(1, (self.slots - 1) // 2)  # a chunk spans <= 2N + 1 rows: never its own rows twice
        if N > chunk:
            for s in range(0, N, chunk):
                e = s + chunk
                self.add_batch(O[s:e], A[s:e], r[s:e], NO[s:e], t[s:e])
            return
        if N == 0:
            return
        first, write_first = self._claim(O[0])
        cont = np.ones(N, dtype=bool)  # obs of add k is bit-for-bit the next_obs of add k - 1
        cont[0] = not write_first
        if N > 1:
            cont[1:] = (O[1:].view(np.int32) == NO[:-1].view(np.int32)).all(axis=1)
        off = np.concatenate([[0], np.cumsum(np.where(cont[1:], 1, 2))])
        s = (first + off) % self.slots
        nx = (s + 1) % self.slots
        for k in range(N):  # the bookkeeping of N add() calls, in the same order
            self._invalidate(int(s[k]))
            self._invalidate(int(nx[k]))
            self._validate(int(s[k]), self.num_added + k)
        self.num_added += N
        write = ~cont  # rows that continue an episode are already stored (as the previous next obs)
        if self._np is not None:
            obs_np, act_np, rew_np, term_np = self._np
            obs_np[nx] = NO
            obs_np[s[write]] = O[write]
            act_np[s], rew_np[s], term_np[s] = A, r, t
            if self._improved_np is not None:
                self._improved_np[s] = A
        else:
            dev = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(self.device)  # noqa: E731
            si, nxi = dev(s.astype(np.int64)), dev(nx.astype(np.int64))
            self.obs[nxi] = dev(NO)
            self.obs[dev(s[write].astype(np.int64))] = dev(O[write])
            self.action[si], self.reward[si], self.terminal[si] = dev(A), dev(r), dev(t)
            if self.improved is not None:
                self.improved[si] = self.action[si]
        self._cursor, self._pending = int(nx[-1]), NO[-1].copy()

    # ------------------------------------------------------------------ reading
    def _gather(self, idx: torch.Tensor) -> Batch:
        nxt = (idx + 1) % self.slots
        return Batch(self.obs[idx], self.action[idx], self.reward[idx], self.obs[nxt], self.terminal[idx])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """`batch_size` transitions drawn uniformly (with replacement) among the sampleable ones.
        generator: a stream other than the buffer's own (diagnostics that must not move it)."""
        return self._gather(self.sample_slots(batch_size, generator))

    def sample_slots(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The start slots of `batch_size` transitions drawn as sample() draws them: (B,) int64 on
        the buffer's device, from the same stream (or `generator`, on the buffer's device). They
        name the same transitions until the next add()."""
        if self._n == 0:
            raise ValueError("ReplayBuffer.sample: the buffer holds no transition yet")
        self._flush()
        k = torch.randint(0, self._n, (batch_size,), device=self.device,
                          generator=self.generator if generator is None else generator)
        return self._starts[k]

    # ------------------------------------------------------------------ improved actions (DIPO)
    def track_improved_actions(self) -> None:
        """Start keeping the improved-action column; every stored transition starts with its own
        action, and so does every transition added from now on. Calling it again does nothing."""
        if self.improved is not None:
            return
        self.improved = self.action.clone()
        if self._on_cpu:
            self._improved_np = self.improved.numpy()

    def _require_improved(self) -> torch.Tensor:
        if self.improved is None:
            raise RuntimeError("ReplayBuffer: call track_improved_actions() before using improved actions")
        return self.improved

    def improved_pairs(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(obs (B, S), improved action (B, A)) of the transitions starting at `slots`."""
        return self.obs[slots], self._require_improved()[slots]

    def write_improved(self, slots: torch.Tensor, actions: torch.Tensor) -> None:
        """Overwrite the improved actions of the transitions starting at `slots` (from
        sample_slots since the last add) with `actions` (B, A). A slot drawn twice gets one of its
        rows (DIPO improves both copies identically)."""
        improved = self._require_improved()
        improved[slots] = actions.detach().to(improved.device, improved.dtype)

    def _slots_in_add_order(self) -> np.ndarray:
        slots = self._list[:self._n].astype(np.int64)
        return slots[np.argsort(self._added[slots], kind="stable")]

    def transition(self, i: int) -> Batch:
        """The i-th transition ever added (0-based; negative counts from the last), one row per
        field: obs (S,), action (A,), reward (), next_obs (S,), terminal (). IndexError when it
        is no longer stored (overwritten) or does not exist."""
        if i < 0:
            i += self.num_added
        hit = np.flatnonzero(self._added == i) if 0 <= i < self.num_added else []
        if len(hit) == 0:
            raise IndexError(f"transition {i} is not stored (added so far: {self.num_added}, "
                             f"stored: {len(self)})")
        b = self._gather(torch.tensor([int(hit[0])], device=self.device))
        return Batch(*(x[0] for x in b))

    def transitions(self) -> Batch:
        """Every stored (sampleable) transition, oldest first, as one batch."""
        return self._gather(self.stored_slots())

    def stored_slots(self) -> torch.Tensor:
        """Start slots of the stored transitions, oldest first (the order of transitions())."""
        return torch.from_numpy(self._slots_in_add_order()).to(self.device)

    def stored_indices(self) -> list[int]:
        """add() indices of the stored transitions, oldest first."""
        return self._added[self._slots_in_add_order()].tolist()

    @property
    def valid(self) -> torch.Tensor:
        """(slots,) bool, on the host: slot i starts a sampleable transition."""
        return torch.from_numpy(self._pos >= 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the rows that hold stored transitions (not the
        unused tail of a ring that has not wrapped yet), the bookkeeping and the sampling stream."""
        valid = np.flatnonzero(self._pos >= 0)
        hi = 0 if len(valid) == 0 else min(self.slots, int(valid.max()) + 2)  # a start and its next row
        rows = {name: getattr(self, name)[:hi].cpu().clone() for name in ("obs", "action", "reward", "terminal")}
        if self.improved is not None:
            rows["improved"] = self.improved[:hi].cpu().clone()
        return {"capacity": self.capacity, "obs_dim": self.obs_dim, "action_dim": self.action_dim,
                "rows": rows, "list": np.array(self._list[:self._n]), "pos": self._pos.copy(),
                "added": self._added.copy(), "n": self._n, "cursor": self._cursor,
                "pending": None if self._pending is None else self._pending.copy(),
                "num_added": self.num_added, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        shape = (state["capacity"], state["obs_dim"], state["action_dim"])
        if shape != (self.capacity, self.obs_dim, self.action_dim):
            raise ValueError(f"replay buffer in the checkpoint has (capacity, obs_dim, action_dim) = {shape}, "
                             f"this run's is {(self.capacity, self.obs_dim, self.action_dim)}")
        rows = state["rows"]
        if "improved" in rows:
            self.track_improved_actions()
        for name, x in rows.items():
            getattr(self, name)[:len(x)] = x.to(self.device)
        n = state["n"]
        self._list[:n] = state["list"]
        self._pos[:], self._added[:] = state["pos"], state["added"]
        self._n, self._cursor, self.num_added = n, state["cursor"], state["num_added"]
        self._pending = state["pending"]
        self._dirty, self._dirty_all = [], not self._on_cpu  # the device mirror is resent once
        self.generator.set_state(state["generator"])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the buffer holds: the data tensors plus the index bookkeeping."""
        tensors = [self.obs, self.action, self.reward, self.terminal, self._starts]
        tensors += [self.improved] if self.improved is not None else []
        n = sum(x.numel() * x.element_size() for x in tensors)
        n += self._pos.nbytes + self._added.nbytes + (0 if self._on_cpu else self._list.nbytes)
        return n + (self._pending.nbytes if self._pending is not None else 0)

    def __len__(self) -> int:
        return self._n


class SeedBuffers:
    """One replay buffer per seed (each with its own sampling stream); sample() stacks their
    minibatches into (N, B, ...) tensors for the seed-batched agents."""

    def __init__(self, buffers: list[ReplayBuffer], seeds: list[int]):
        self.buffers = list(buffers)
        for buf, seed in zip(self.buffers, seeds):
            buf.seed(BUFFER_STREAM + seed)  # a stream of its own, apart from the init stream

    def __getitem__(self, k: int) -> ReplayBuffer:
        return self.buffers[k]

    def __len__(self) -> int:
        """Transitions every seed's buffer can provide."""
        return min(len(b) for b in self.buffers)

    def sample(self, batch_size: int, generators: list[torch.Generator] | None = None) -> Batch:
        """generators: one per seed, used instead of the buffers' own streams (which they leave as
        they are)."""
        gens = generators if generators is not None else [None] * len(self.buffers)
        if len(self.buffers) == 1:
            return Batch(*(x.unsqueeze(0) for x in self.buffers[0].sample(batch_size, gens[0])))
        parts = [b.sample(batch_size, g) for b, g in zip(self.buffers, gens)]
        return Batch(*(torch.stack(xs) for xs in zip(*parts)))

    # improved actions (DIPO's diffusion buffer), one column per seed's buffer
    def track_improved_actions(self) -> None:
        for b in self.buffers:
            b.track_improved_actions()

    def sample_improved(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots (N, B), obs (N, B, S), improved actions (N, B, A)), each seed from its own
        buffer and sampling stream."""
        slots = [b.sample_slots(batch_size) for b in self.buffers]
        obs, improved = zip(*(b.improved_pairs(s) for b, s in zip(self.buffers, slots)))
        return torch.stack(slots), torch.stack(obs), torch.stack(improved)

    def write_improved(self, slots: torch.Tensor, actions: torch.Tensor) -> None:
        """slots (N, B) from sample_improved, actions (N, B, A): seed k's rows go to buffer k."""
        for k, b in enumerate(self.buffers):
            b.write_improved(slots[k], actions[k])
