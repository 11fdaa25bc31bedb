"One input check (issue 13, item 3): the policy, the runtime and the edge deployer refuse the same bad input with the same message."
import re
import numpy as np
import pytest
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.data import Normalizer, check_observation
from vla_nb.language import MAX_COMMAND_CHARS, default_tokenizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
from vla_nb.deployment import DeployConfig, EdgeConfig, EdgeVLADeployer, OptimizedVLAInference, export_artifact

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


@pytest.fixture(scope='module')
def policy():
    tok = default_tokenizer(); seed_everything(0)
    return VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok)


@pytest.fixture(scope='module')
def art(policy, tmp_path_factory):
    return export_artifact(policy, tmp_path_factory.mktemp('check')/'artifact', DeployConfig(int8=False))


@pytest.fixture(scope='module')
def runtime(art): return OptimizedVLAInference(art, warmup=0)


@pytest.fixture(scope='module')
def edge(art):
    e = EdgeVLADeployer(art, EdgeConfig(warmup=0, realtime=False)).start()
    yield e
    e.stop()


@pytest.fixture(scope='module')
def obs():
    env = sim.TabletopEnv(image_size=48); o, _ = env.reset(seed=3); env.close()
    return o


BAD = {   # name: (how the observation is spoiled, what the message must say)
    'proprio of the wrong length': (lambda o: {**o, 'proprio': o['proprio'][:10]}, r'proprio must have shape \(15,\), got \(10,\)'),
    'NaN proprio': (lambda o: {**o, 'proprio': np.where(np.arange(15) == 4, np.nan, o['proprio'])}, r'NaN at indices \[4\]'),
    'inf proprio': (lambda o: {**o, 'proprio': np.full(15, np.inf, np.float32)}, 'proprio contains inf'),
    'proprio not numbers': (lambda o: {**o, 'proprio': 'abc'}, 'proprio must be 15 numbers'),
    'command=None': (lambda o: {**o, 'command': None}, 'command must be a str, got NoneType'),
    'command=bytes': (lambda o: {**o, 'command': b'pick up the red cup'}, 'command must be a str, got bytes'),
    'empty command': (lambda o: {**o, 'command': ' '}, 'command is empty'),
    '40,000-character command': (lambda o: {**o, 'command': 'pick up the cup ' * 2500},
                                 f'command is 40000 characters long; the limit is {MAX_COMMAND_CHARS}'),
    'too many words': (lambda o: {**o, 'command': 'find the book' + ' ,' * 14}, 'command has 17 words'),
    'unknown words': (lambda o: {**o, 'command': 'xyzzy plugh'}, r"unknown word\(s\) \['xyzzy', 'plugh'\]"),
    'float image': (lambda o: {**o, 'image': o['image'] / 255.}, 'image must be uint8 RGB pixels'),
    'RGBA image': (lambda o: {**o, 'image': np.dstack([o['image'], o['image'][..., :1]])}, '3 RGB channels, got \\(48, 48, 4\\)'),
    'grey image': (lambda o: {**o, 'image': o['image'][..., 0]}, '3 RGB channels, got \\(48, 48\\)'),
    'tiny image': (lambda o: {**o, 'image': o['image'][:4, :4]}, 'too small to resize'),
    'missing key': (lambda o: {'image': o['image'], 'command': o['command']}, r"obs lacks \['proprio'\]"),
    'not a dict': (lambda o: [o['image']], 'obs must be a dict'),
    'unexpected wrist image': (lambda o: {**o, 'wrist_image': o['image']}, 'reads no wrist camera'),
}


def _message(fn, x) -> str:
    with pytest.raises(ValueError) as e: fn(x)
    return str(e.value)


@pytest.mark.parametrize('case', list(BAD))
def test_policy_runtime_and_edge_raise_the_same_error(case, policy, runtime, edge, obs):
    spoil, msg = BAD[case]
    bad = spoil(obs)
    got = {'VLAPolicy': _message(policy.predict_action_chunk, bad), 'OptimizedVLAInference': _message(runtime.predict_action_chunk, bad),
           'OptimizedVLAInference.select_action': _message(runtime.select_action, bad), 'EdgeVLADeployer.submit': _message(edge.submit, bad)}
    assert len(set(got.values())) == 1, got                                # one check, one message
    assert re.search(msg, got['VLAPolicy']), got['VLAPolicy']
    ref = _message(lambda o: check_observation(o, 48, 15, policy.tokenizer), bad)   # ... and it is `check_observation`'s
    assert got['VLAPolicy'] == ref


@pytest.mark.parametrize('case', list(BAD))
def test_policy_select_action_raises_the_same_error(case, policy, obs):
    spoil, _ = BAD[case]
    bad = spoil(obs)
    assert _message(policy.select_action, bad) == _message(policy.predict_action_chunk, bad)


def test_bad_input_leaves_every_consumer_working(policy, runtime, edge, obs):
    ref = policy.predict_action_chunk(obs)
    for spoil, _ in BAD.values():
        for fn in (policy.predict_action_chunk, runtime.predict_action_chunk, edge.submit):
            with pytest.raises(ValueError): fn(spoil(obs))
    np.testing.assert_allclose(runtime.predict_action_chunk(obs), ref, atol=1e-4)
    np.testing.assert_array_equal(policy.predict_action_chunk(obs), ref)
    assert edge.errors == 0 and edge.processed == 0                        # refused in the caller's thread: nothing queued
    fid = edge.submit(obs); r = edge.get_result(timeout=10)
    assert r['frame'] == fid and r['error'] is None and np.abs(r['actions'] - ref).max() < 1e-4


def test_allow_unknown_words_is_explicit_and_counted(policy, art, obs):
    unk = {**obs, 'command': 'pick up the xyzzy cup'}
    p = VLAPolicy(policy.net, policy.norm, policy.tokenizer, allow_unknown_words=True)
    rt = OptimizedVLAInference(art, warmup=0, allow_unknown_words=True)
    assert p.unknown_word_commands == 0 and rt.get_performance_metrics()['unknown_word_commands'] == 0
    a, b = p.predict_action_chunk(unk), rt.predict_action_chunk(unk)
    np.testing.assert_allclose(a, b, atol=1e-4)                            # both read the word as <unk>
    tok = policy.tokenizer
    ids = tok.encode('pick up the xyzzy cup', allow_unknown=True)[0]
    assert tok.decode(ids) == 'pick up the <unk> cup'
    p.predict_action_chunk(obs); rt.predict_action_chunk(obs)             # known words are not counted
    p.predict_action_chunk(unk)
    assert p.unknown_word_commands == 2 and rt.get_performance_metrics()['unknown_word_commands'] == 1
    batch = {'image': np.stack([obs['image']] * 3), 'proprio': np.stack([obs['proprio']] * 3),
             'command': ['pick up the xyzzy cup', 'pick up the red cup', 'find the plugh']}
    p.predict_action_chunk(batch)
    assert p.unknown_word_commands == 4                                    # counted per command of a batch
    for over in ('x' * 40_000, None):                                      # the flag admits unknown words, nothing else
        for fn in (p.predict_action_chunk, rt.predict_action_chunk):
            with pytest.raises(ValueError): fn({**obs, 'command': over})
    with pytest.raises(ValueError, match='unknown word'): policy.predict_action_chunk(unk)   # the default refuses
    assert policy.unknown_word_commands == 0
