"""ReplayBuffer: every sample is an exact added transition, across episode ends and wrap-around."""

import numpy as np
import pytest
import torch

from qvpo.buffers import ReplayBuffer
from qvpo.errors import ConfigError

S, A = 4, 2  # obs[0] holds a unique observation id, so each stored row can be told apart
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def episodes(seed, n_steps, max_len=8, reset_equals_last=0.0):
    """An env-step stream as the trainer adds it: (obs, action, reward, next_obs, terminal)
    float32 rows in order, episodes of random length 1..max_len, half terminated, half truncated;
    after an episode the next obs is a fresh reset observation (with probability
    `reset_equals_last` bit-for-bit the final next obs). Also returns the episode boundaries:
    the add() indices whose next_obs is not the following add's obs."""
    rng = np.random.default_rng(seed)
    ids = iter(range(10**7))

    def new_obs():
        v = rng.standard_normal(S).astype(np.float32)
        v[0] = next(ids)
        return v

    out, ends = [], []
    obs = new_obs()
    while len(out) < n_steps:
        length, terminated = int(rng.integers(1, max_len + 1)), bool(rng.random() < 0.5)
        for t in range(length):
            nxt = new_obs()
            last = t == length - 1
            out.append((obs, rng.uniform(-1, 1, A).astype(np.float32), np.float32(rng.standard_normal()),
                        nxt, float(terminated and last)))
            obs = nxt
        reset = obs.copy() if rng.random() < reset_equals_last else new_obs()
        if not np.array_equal(reset, obs):
            ends.append(len(out) - 1)
        obs = reset
    return out[:n_steps], [e for e in ends if e < n_steps - 1]


def key(obs, action, reward, next_obs, terminal) -> bytes:
    return np.concatenate([obs, action, [reward], next_obs, [terminal]]).astype(np.float32).tobytes()


def batch_keys(b) -> list[bytes]:
    m = torch.cat([b.obs, b.action, b.reward[:, None], b.next_obs, b.terminal[:, None]], 1)
    return [row.tobytes() for row in m.cpu().numpy()]


def expected_stored(n_added, ends, capacity):
    """Spec of what a capacity-`capacity` buffer keeps after `n_added` adds: transition k uses
    observation rows p_k (its obs) and p_k + 1 (its next obs), p advancing by one row per step and
    by one more after an episode end; the ring keeps the latest capacity + 1 rows."""
    p, rows, ends = [], 0, set(ends)
    for k in range(n_added):
        p.append(rows)
        rows += 2 if k in ends else 1
    newest = p[-1] + 1 if p else -1
    return [k for k in range(n_added) if p[k] >= newest - capacity]


def fill(buf, stream, chunk=None):
    if chunk is None:
        for tr in stream:
            buf.add(*tr)
    else:
        for s in range(0, len(stream), chunk):
            rows = stream[s:s + chunk]
            buf.add_batch(*[np.stack([r[f] for r in rows]) for f in range(5)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_samples_are_exact_transitions_and_cover_all(device, chunk):
    stream, ends = episodes(0, 300)
    assert len(ends) > 30
    buf = ReplayBuffer(S, A, capacity=1000, device=device)
    buf.seed(0)
    fill(buf, stream, chunk)
    added = {key(*tr): k for k, tr in enumerate(stream)}
    assert len(buf) == len(stream) == buf.num_added
    seen = set()
    for _ in range(100):
        b = buf.sample(256)
        assert b.obs.shape == (256, S) and b.next_obs.shape == (256, S) and b.action.shape == (256, A)
        assert b.reward.shape == (256,) and b.terminal.shape == (256,)
        assert all(x.dtype == torch.float32 and x.device.type == device for x in b)
        ks = batch_keys(b)
        assert all(k in added for k in ks)  # exact: never a pair spanning two episodes
        seen.update(added[k] for k in ks)
    assert seen == set(range(len(stream)))  # every transition (truncated ends too) comes back
    assert buf.transitions().obs.shape == (300, S)
    assert batch_keys(buf.transitions()) == [key(*tr) for tr in stream]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", [1, 2, 5, 17])
def test_wraparound_keeps_only_the_latest_whole_transitions(device, capacity):
    stream, ends = episodes(capacity, 40 * (capacity + 1), max_len=6)
    added = {key(*tr): k for k, tr in enumerate(stream)}
    buf = ReplayBuffer(S, A, capacity=capacity, device=device)
    buf.seed(1)
    for n, tr in enumerate(stream, start=1):
        buf.add(*tr)
        expected = expected_stored(n, [e for e in ends if e < n], capacity)
        # (3) len() = the sampleable transitions, the latest ones that still have both rows
        assert buf.stored_indices() == expected
        assert len(buf) == len(expected) == int(buf.valid.sum())
        assert expected == list(range(n - len(expected), n))  # a suffix of what was added
        assert len(expected) >= 1  # the transition just added is always sampleable
        if n % 3 == 0 or n > len(stream) - 5:
            got = [added.get(k) for k in batch_keys(buf.sample(64))]
            assert None not in got  # no pair across episodes, none with an overwritten next row
            assert set(got) <= set(expected)
        if n % 11 == 0:
            assert batch_keys(buf.transitions()) == [key(*stream[k]) for k in expected]
            for k in (expected[0], expected[-1]):
                one = buf.transition(k)
                assert one.obs.shape == (S,) and one.reward.shape == () and one.terminal.shape == ()
                assert key(*(x.cpu().numpy() for x in one)) == key(*stream[k])
    # an unbroken stream keeps exactly `capacity` transitions
    run = [(np.full(S, i, np.float32), np.zeros(A, np.float32), 0.0, np.full(S, i + 1, np.float32), 0.0)
           for i in range(3 * capacity + 2)]
    fill(buf, run)
    assert len(buf) == capacity


def test_reset_equal_to_final_obs_is_still_exact():
    stream, ends = episodes(5, 200, reset_equals_last=0.5)
    added = {key(*tr): k for k, tr in enumerate(stream)}
    buf = ReplayBuffer(S, A, capacity=50)
    buf.seed(0)
    fill(buf, stream)
    assert set(added[k] for k in batch_keys(buf.sample(2000))) == set(buf.stored_indices())


@pytest.mark.parametrize("device", DEVICES)
def test_add_batch_equals_add_loop(device):
    stream, _ = episodes(3, 500)
    bufs = []
    for chunk in [None, 1, 13, 500]:
        buf = ReplayBuffer(S, A, capacity=60, device=device)  # chunks wrap the ring
        buf.seed(7)
        fill(buf, stream, chunk)
        bufs.append(buf)
    ref = bufs[0]
    for buf in bufs[1:]:
        assert buf.stored_indices() == ref.stored_indices() and len(buf) == len(ref)
        assert batch_keys(buf.transitions()) == batch_keys(ref.transitions())
        buf.seed(7)
        ref.seed(7)
        for _ in range(3):  # same seed, same bookkeeping: the same minibatches
            assert batch_keys(buf.sample(32)) == batch_keys(ref.sample(32))


def test_transition_index_errors_and_bad_capacity():
    buf = ReplayBuffer(S, A, capacity=3)
    with pytest.raises(ValueError):
        buf.sample(1)
    with pytest.raises(IndexError):
        buf.transition(0)
    for i in range(10):  # one continuing episode
        buf.add(np.full(S, i, np.float32), np.zeros(A), 1.0, np.full(S, i + 1, np.float32), False)
    assert buf.stored_indices() == [7, 8, 9]
    assert buf.transition(-1).next_obs.tolist() == [10.0] * S
    with pytest.raises(IndexError):
        buf.transition(6)
    for bad in [0, -1, 2.0, True]:
        with pytest.raises(ConfigError):
            ReplayBuffer(S, A, capacity=bad)


def held_bytes(buf) -> int:
    """Bytes of memory behind every tensor and numpy array among the buffer's attributes (also
    inside lists and tuples), found by walking the object rather than asking it; a block seen
    through several views (a tensor and its .numpy()) counts once."""
    blocks = set()

    def visit(x):
        if torch.is_tensor(x):
            storage = x.untyped_storage()
            blocks.add((x.device.type, storage.data_ptr(), storage.nbytes()))
        elif isinstance(x, np.ndarray):
            while isinstance(x.base, np.ndarray):
                x = x.base
            blocks.add(("cpu", x.__array_interface__["data"][0], x.nbytes))
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    for value in vars(buf).values():
        visit(value)
    total = 0
    for device in {d for d, _, _ in blocks}:  # the union of the [start, end) spans, per device
        end = 0
        for lo, hi in sorted((p, p + n) for d, p, n in blocks if d == device):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


@pytest.mark.parametrize("device", DEVICES)
def test_nbytes_is_the_memory_the_buffer_holds(device):
    """nbytes = the memory of every array the buffer keeps, each once: empty, filled past
    wrap-around (filling allocates nothing but the pending next observation) and with the
    improved-action column."""
    buf = ReplayBuffer(S, A, capacity=37, device=device)
    empty = buf.nbytes
    assert empty == held_bytes(buf)
    fill(buf, episodes(0, 120)[0])
    assert buf.nbytes == held_bytes(buf) == empty + S * 4
    buf.track_improved_actions()
    assert buf.nbytes == held_bytes(buf) == empty + S * 4 + buf.slots * A * 4


def test_nbytes_scales_with_one_observation_ring():
    """Each observation is stored once: one more observation dimension costs one float32 per
    slot (capacity + 1 of them), not two (separate obs and next_obs arrays); so does one more
    action dimension. The size is linear in capacity, and at Humanoid's shapes (348, 17) and the
    paper's capacity of 1,000,000 it is under 1.6 GB (separate obs and next_obs: 2.9 GB). Sizes
    are checked on small buffers (nbytes is the memory held: the test above) and extrapolated."""
    size = lambda s, a, c: ReplayBuffer(s, a, capacity=c).nbytes  # noqa: E731
    c = 1000
    assert size(S + 1, A, c) - size(S, A, c) == 4 * (c + 1)
    assert size(S, A + 1, c) - size(S, A, c) == 4 * (c + 1)
    per_slot = size(S, A, c + 1) - size(S, A, c)
    assert size(S, A, c + 10) - size(S, A, c) == 10 * per_slot  # linear in capacity
    bookkeeping = per_slot - 4 * (S + A + 2)  # data: obs, action, reward, terminal per slot
    assert 0 < bookkeeping <= 24  # the start list and its index maps: at most three words per slot
    humanoid_slot = size(348, 17, c + 1) - size(348, 17, c)
    humanoid = size(348, 17, c) + (1_000_000 - c) * humanoid_slot
    assert humanoid <= 1.6e9
    assert humanoid < 1_000_001 * (348 + 17 + 2) * 4 + 25e6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_improved_actions_start_as_the_taken_action_and_are_written_back(device, chunk):
    """DIPO's diffusion buffer: an opt-in column, one action per stored transition."""
    stream, _ = episodes(4, 90)
    buf = ReplayBuffer(S, A, capacity=40, device=device)  # wraps: later adds overwrite written slots
    buf.seed(3)
    fill(buf, stream[:30], chunk)
    assert buf.improved is None
    with pytest.raises(RuntimeError, match="track_improved_actions"):
        buf.improved_pairs(buf.stored_slots())
    before = buf.nbytes
    buf.track_improved_actions()
    buf.track_improved_actions()  # idempotent
    assert buf.nbytes == before + buf.slots * A * 4
    # transitions stored before tracking started begin with their own action
    obs, improved = buf.improved_pairs(buf.stored_slots())
    stored = buf.transitions()
    assert torch.equal(obs, stored.obs) and torch.equal(improved, stored.action)

    # sample_slots draws what sample() draws, from the same stream
    buf.seed(9)
    b = buf.sample(16)
    buf.seed(9)
    slots = buf.sample_slots(16)
    obs, improved = buf.improved_pairs(slots)
    assert slots.shape == (16,) and slots.dtype == torch.int64 and slots.device.type == device
    assert torch.equal(obs, b.obs) and torch.equal(improved, b.action)

    # written back: the same slots return the new actions, every other slot keeps its own
    per_slot = torch.rand(buf.slots, A, device=device) * 2 - 1
    new = per_slot[slots]  # a slot drawn twice gets equal rows (as DIPO writes them)
    buf.write_improved(slots, new)
    assert torch.equal(buf.improved_pairs(slots)[1], new)
    all_slots = buf.stored_slots()
    untouched = ~torch.isin(all_slots, slots)
    assert untouched.sum() > 0
    assert torch.equal(buf.improved_pairs(all_slots[untouched])[1], buf.transitions().action[untouched])
    # the Batch of the replay buffer is unchanged by a write
    buf.seed(9)
    assert batch_keys(buf.sample(16)) == batch_keys(b)

    # transitions added later (over written slots too) start with their own action
    fill(buf, stream[30:], chunk)
    obs, improved = buf.improved_pairs(buf.stored_slots())
    stored = buf.transitions()
    assert buf.stored_indices()[0] >= 30  # every written transition has been overwritten
    assert torch.equal(improved, stored.action) and torch.equal(obs, stored.obs)


def test_seed_buffers_route_improved_actions_per_seed():
    from qvpo.buffers import SeedBuffers

    bufs = []
    for seed in (0, 1):
        buf = ReplayBuffer(S, A, capacity=50)
        fill(buf, episodes(seed, 20)[0])
        bufs.append(buf)
    sb = SeedBuffers(bufs, [0, 1])
    sb.track_improved_actions()
    slots, obs, improved = sb.sample_improved(8)
    assert slots.shape == (2, 8) and obs.shape == (2, 8, S) and improved.shape == (2, 8, A)
    for k in range(2):
        o, a = bufs[k].improved_pairs(slots[k])
        assert torch.equal(o, obs[k]) and torch.equal(a, improved[k])
    new = torch.stack([torch.full((8, A), 0.25), torch.full((8, A), -0.5)])
    sb.write_improved(slots, new)
    assert (bufs[0].improved_pairs(slots[0])[1] == 0.25).all()
    assert (bufs[1].improved_pairs(slots[1])[1] == -0.5).all()
