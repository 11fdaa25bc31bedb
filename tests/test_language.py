"Contracts of the language chapter (vla_nb.language): one tokenizer, from the dataset through a trained checkpoint to the token env and SB3."
import gymnasium as gym
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.data import IMAGE, PROPRIO
from vla_nb.language import (MAX_COMMAND_CHARS, CommandTokenizer, CommandTokens, command_corpus, default_tokenizer,
                             make_token_env)
from vla_nb.model import ModelConfig, VLAFeaturesExtractor, VLANet, VLAPolicy, load_weights
from vla_nb.imitation import ImitationConfig, VLAImitationLearner

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


@pytest.fixture(scope='module')
def tok(): return default_tokenizer()


@pytest.fixture(scope='module')
def trained(tiny_data, tmp_path_factory):
    "A policy trained and saved through the project's own path (a recorded dataset, a few behaviour-cloning steps), loaded back."
    out = tmp_path_factory.mktemp('trained')
    t = tiny_data.tokenizer; torch.manual_seed(0)
    net = VLANet(ModelConfig(**SMALL, vocab_size=t.vocab_size, max_tokens=t.max_len))
    cfg = ImitationConfig(out_dir=str(out), batch_size=16, eval_every=0, warmup_steps=1, val_frac=0.2)
    learner = VLAImitationLearner(net, tiny_data, cfg)
    learner.train_imitation(1, max_steps=3)
    assert learner.step == 3
    learner.policy().save(out/'policy.safetensors')
    return VLAPolicy.load(out/'policy.safetensors')


def token_wrapper(env):
    "The `CommandTokens` layer inside what `gym.make` returns (under gymnasium's checker wrappers)."
    while not isinstance(env, CommandTokens): env = env.env
    return env


# ---- the tokenizer's own contract ----

def test_every_corpus_command_encodes_within_max_len(tok):
    corpus = command_corpus()
    assert len(corpus) == len(set(corpus)) > 200
    for c in corpus:
        ids, mask = tok.encode(c)
        assert ids.dtype == np.int64 and mask.sum() == len(c.replace(',', ' ,').split()) and (ids[~mask] == 0).all()
        assert tok.decode(ids) == c.replace(',', ' ,')                  # every word is in the vocabulary, commas are tokens
    assert tok.pad_id == 0 and tok.decode(tok.encode('pick up the red cup')[0]) == 'pick up the red cup'


@pytest.mark.parametrize('bad,msg', [
    (None, 'command must be a str, got NoneType'), (b'find the book', 'command must be a str, got bytes'),
    (3, 'command must be a str, got int'), ('   ', 'command is empty'),
    ('x' * 40_000, f'command is 40000 characters long; the limit is {MAX_COMMAND_CHARS}'),
    ('find the book' + ' ,' * 14, 'command has 17 words; the model reads at most 16'),
    ('xyzzy plugh', r"unknown word\(s\) \['xyzzy', 'plugh'\]"), ('pick up the Teapot', r"\['Teapot'\]")])
def test_encode_refuses_what_a_policy_cannot_read(tok, bad, msg):
    with pytest.raises(ValueError, match=msg): tok.encode(bad)


def test_allow_unknown_reads_unknown_words_as_unk_only(tok):
    ids, mask = tok.encode('pick up the xyzzy cup', allow_unknown=True)
    assert tok.decode(ids) == 'pick up the <unk> cup' and int(mask.sum()) == 5 and (ids == tok.unk_id).sum() == 1
    assert tok.unknown_words('pick up the xyzzy CUP plugh') == ['xyzzy', 'plugh']
    assert tok.unknown_words('pick up the red cup') == []
    for bad, msg in ((None, 'must be a str'), ('x' * 40_000, 'limit'), ('find the book' + ' ,' * 14, '17 words')):
        with pytest.raises(ValueError, match=msg): tok.encode(bad, allow_unknown=True)   # the flag admits words, nothing else


def test_json_round_trip_and_equality(tok):
    back = CommandTokenizer.from_json(tok.to_json())
    assert back == tok and back.max_len == 16 and back.vocab_size == tok.vocab_size
    assert CommandTokenizer.build(command_corpus()) == tok                 # building is deterministic
    other = CommandTokenizer.build(['find the book'])
    assert other != tok and other.vocab_size == 5                         # <pad> <unk> find the book
    assert CommandTokenizer.build(command_corpus(), max_len=12) != tok    # max_len is part of the tokenizer
    with pytest.raises(ValueError, match='not a CommandTokenizer JSON'): CommandTokenizer.from_json('{"max_len": 4}')


# ---- one tokenizer everywhere (issue 13, item 1) ----

def test_dataset_and_token_env_share_the_course_tokenizer(tiny_data, tok):
    assert tiny_data.tokenizer == tok
    env = gym.make(sim.TOKEN_ENV_ID, image_size=48)
    try: assert token_wrapper(env).tokenizer == tok
    finally: env.close()


def test_trained_policy_reads_the_token_envs_ids_for_every_command(trained):
    pol = trained
    env = gym.make(sim.TOKEN_ENV_ID, image_size=48)
    try:
        wrap, corpus = token_wrapper(env), command_corpus()
        for c in corpus:                                                   # the mapping the env applies to every observation
            np.testing.assert_array_equal(wrap.observation({'command': c})['command'], pol.tokenizer.encode(c)[0], err_msg=c)
        for i, c in enumerate(corpus[::9]):                                # and through real resets
            obs, info = env.reset(seed=i, options=dict(command=c))
            np.testing.assert_array_equal(obs['command'], pol.tokenizer.encode(info['command'])[0], err_msg=c)
        assert env.observation_space['command'].high.max() == pol.tokenizer.vocab_size - 1 == pol.cfg.vocab_size - 1
    finally: env.close()


def test_sb3_extractor_with_the_trained_weights_reads_the_same_ids(trained):
    "The extractor, given the trained network, computes from the token env's observation exactly the policy's features."
    from stable_baselines3.common.preprocessing import preprocess_obs
    from stable_baselines3.common.utils import obs_as_tensor
    pol = trained
    env = make_token_env(image_size=48)
    ext = VLAFeaturesExtractor(env.observation_space, config=pol.cfg, stats=pol.norm.stats())
    load_weights(ext.net, pol.net.state_dict())                           # the same vocabulary size, or this raises
    assert ext.net.cfg == pol.cfg
    feats, ref, texts = [], [], []
    try:
        for i, c in enumerate(['pick up the red cup', 'put the book on the shelf', 'navigate to the office', 'find the green ball']):
            tok_obs, info = env.reset(seed=i, options=dict(command=c))
            batch = {k: v[None] for k, v in tok_obs.items()}
            with torch.no_grad():
                feats.append(ext(preprocess_obs(obs_as_tensor(batch, 'cpu'), env.observation_space))[0])   # as SB3 feeds it
                text_obs = {'image': tok_obs['image'], 'proprio': tok_obs['proprio'], 'command': info['command']}
                img, ids, pro, _, _ = pol._tensors(text_obs)                     # the policy's own preprocessing of the text
                ref.append(pol.net.encode(img, ids, pro)[0])
                np.testing.assert_array_equal(ids[0].numpy(), tok_obs['command'])
    finally: env.close()
    torch.testing.assert_close(torch.stack(feats), torch.stack(ref), atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                                 # and the ids matter: another command, other features
        other = {**batch, 'command': pol.tokenizer.encode('pick up the red cup')[0][None]}
        swapped = ext(preprocess_obs(obs_as_tensor(other, 'cpu'), env.observation_space))[0]
    assert (swapped - feats[-1]).abs().max() > 1e-4
