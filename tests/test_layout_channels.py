"""Channel settings follow the cache, not BBBC021: '' = the cache's first channel (DAPI in
BBBC021, DNA in Cell Painting), named channels kept, older runs' configs still resume."""

from __future__ import annotations

import pytest

from napari_wsdino.core.layout import CHECKPOINT_FILE, CONFIG_FILE, channel_dir
from napari_wsdino.core.modelset import ModelSet, run_channels
from napari_wsdino.core.screens import CELLPAINTING_CHANNELS, CHANNELS
from napari_wsdino.core.train.settings import (
    TrainConfig,
    TrainingError,
    resolve_config,
    resume_conflicts,
    with_cache_channels,
)


def test_empty_channels_become_the_caches_first():
    assert TrainConfig().channel == "" and TrainConfig().nuclei_channel == ""
    cp = with_cache_channels(TrainConfig(), CELLPAINTING_CHANNELS)
    assert (cp.channel, cp.nuclei_channel) == ("DNA", "DNA")
    named = with_cache_channels(TrainConfig(channel="Actin", nuclei_channel="DAPI"), CHANNELS)
    assert (named.channel, named.nuclei_channel) == ("Actin", "DAPI")
    with pytest.raises(ValueError, match="no channels"):
        with_cache_channels(TrainConfig(), ())


def test_toml_round_trip_keeps_empty_and_named_channels(tmp_path):
    for config in (TrainConfig(), TrainConfig(channel="Mito", nuclei_channel="DNA")):
        assert TrainConfig.load(config.save(tmp_path / "c.toml")) == config


def _saved_run(folder, text):
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(text)
    (folder / CHECKPOINT_FILE).write_bytes(b"")  # resolve_config only checks it exists


def test_resume_of_a_run_saved_with_dapi_or_before_nuclei_channel(tmp_path):
    # A run of an older version saved the names; one older still had no nuclei_channel.
    _saved_run(tmp_path / "a", '[train]\nchannel = "DAPI"\nnuclei_channel = "DAPI"\nepochs = 4\n')
    _saved_run(tmp_path / "b", '[train]\nchannel = "DAPI"\nepochs = 4\n')
    a = resolve_config(None, {"epochs": 8, "channel": ""}, resume_from=tmp_path / "a")
    assert (a.channel, a.nuclei_channel, a.epochs) == ("DAPI", "DAPI", 8)
    b = resolve_config(None, {"epochs": 8}, resume_from=tmp_path / "b")
    assert (b.channel, b.nuclei_channel) == ("DAPI", "")
    # '' is "not said", never a change; another name is.
    saved = TrainConfig(channel="DAPI", nuclei_channel="DAPI")
    assert resume_conflicts(saved, TrainConfig()) == []
    assert resume_conflicts(saved, TrainConfig(channel="Actin")) == ["channel"]
    with pytest.raises(TrainingError, match="nuclei_channel"):
        resolve_config(None, {"nuclei_channel": "Actin"}, resume_from=tmp_path / "a")


def test_run_channels_follow_the_registered_layouts(tmp_path):
    def run_of(name, channels):
        for ch in channels:
            channel_dir(tmp_path / name, ch).mkdir(parents=True)
            (channel_dir(tmp_path / name, ch) / CHECKPOINT_FILE).write_bytes(b"")
        return tmp_path / name

    assert run_channels(run_of("cp", sorted(CELLPAINTING_CHANNELS))) == list(CELLPAINTING_CHANNELS)
    assert run_channels(run_of("bbbc", ["Actin", "DAPI", "Tubulin"])) == list(CHANNELS)
    assert run_channels(run_of("other", ["Zeta", "Mito", "Alpha"])) == ["Mito", "Alpha", "Zeta"]
    assert run_channels(tmp_path / "empty") == []


def test_baselines_take_the_caches_channels():
    models = ModelSet.random("test_vit", CELLPAINTING_CHANNELS, seed=0)
    assert models.channels == CELLPAINTING_CHANNELS
    with pytest.raises(TypeError):
        ModelSet.random("test_vit")  # no silent BBBC021 channels
