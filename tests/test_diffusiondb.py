"""Tests for the DiffusionDB builder, on tiny fake parts in the real formats."""

import json
import os
import shutil

import numpy as np
import pytest

import built_data
import fake_assets
from reverse_sd.data import build
from reverse_sd.data import build_common
from reverse_sd.data import diffusiondb

SIZE = 32
OPTIONS = dict(image_size=SIZE, validation_fraction=0.25, test_fraction=0.25,
               progress=False)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  return fake_assets.write_diffusiondb(tmp_path_factory.mktemp('manual'))


@pytest.fixture(scope='module')
def built(fake, tmp_path_factory):
  """Parts 1-4 of the 2M collection (part 4 is unreadable), built once."""
  return diffusiondb.build(tmp_path_factory.mktemp('data'), fake.root,
                           parts='1-4', **OPTIONS)


def _report(builder):
  return build_common.read_report(builder)


def _skipped_ids(report):
  """'part-000001/<name>' -> reason, from the skipped entries' file paths."""
  out = {}
  for item in report['skipped']:
    location = item['file'].replace('.zip:', '/').rstrip('/')
    part_folder, name = location.split('/')[-2:]
    out[f'{part_folder}/{name}'] = item['reason']
  return out


def test_builds_every_good_image_with_its_features(built, fake):
  ids = built_data.ids_by_split(built)
  assert set(ids) == {'train', 'validation', 'test'}
  all_ids = [i for split_ids in ids.values() for i in split_ids]
  assert len(all_ids) == len(set(all_ids))
  assert sorted(all_ids) == sorted(fake.good_ids)
  for split in ids:
    for row in built_data.rows(built, split):
      assert row['image'].shape == (SIZE, SIZE, 3)
      assert row['image'].dtype == np.uint8
      row_id = built_data.text(row['id'])
      assert built_data.text(row['prompt']) == fake.good_ids[row_id]
      assert int(row['part']) == int(row_id[5:11])
      assert int(row['steps']) == 50 and built_data.text(row['sampler']) == 'k_lms'
      assert float(row['cfg']) == 7.0 and int(row['seed']) >= 0


def test_no_prompt_is_in_two_splits(built):
  split_of_prompt = {}
  for split in built.info.splits:
    for row in built_data.rows(built, split):
      prompt = build_common.normalise_prompt(built_data.text(row['prompt']))
      assert split_of_prompt.setdefault(prompt, split) == split, prompt
  shared = build_common.normalise_prompt(fake_assets.SHARED_PROMPT)
  assert shared in split_of_prompt  # Its 4 images (2 parts) in one split.


def test_report_lists_every_skip_with_reasons_and_counts_add_up(built, fake):
  report = _report(built)
  assert _skipped_ids(report) == fake.skipped
  reasons = {item['reason']: item for item in report['skipped']}
  assert 'truncated' in reasons['corrupt_image']['detail']
  assert fake.notes['corrupt_name'] in reasons['corrupt_image']['file']
  bad = [i for i in report['skipped'] if i['reason'] == 'bad_json_entry']
  assert any(fake.notes['bad_entry_name'] in i['file'] and "no 'p'" in
             i['detail'] for i in bad)
  assert [p['reason'] for p in report['skipped_parts']] == ['bad_part_json']
  assert 'part-000004' in report['skipped_parts'][0]['file']
  splits = {s: built.info.splits[s].num_examples for s in built.info.splits}
  assert report['examples'] == splits
  assert report['total_examples'] == sum(splits.values()) == len(
      fake.good_ids)
  assert report['items_seen'] == len(fake.good_ids) + len(fake.skipped)
  assert report['total_skipped'] == len(report['skipped']) == sum(
      report['skipped_counts'].values())
  assert report['warning_counts']['prompt_differs_from_metadata'] == 1
  assert report['options']['image_size'] == SIZE
  assert report['parts'] == '1-4'
  folder = os.fspath(built.data_path)
  assert not [f for f in os.listdir(folder) if f.startswith('.tmp')]


def test_builds_are_deterministic_and_splits_ignore_part_selection(
    built, fake, tmp_path):
  again = diffusiondb.build(tmp_path / 'again', fake.root, parts='1-4',
                            num_workers=2, **OPTIONS)
  assert built_data.ids_by_split(again) == built_data.ids_by_split(built)
  for split in built.info.splits:
    for first, second in zip(built_data.rows(built, split), built_data.rows(again, split)):
      np.testing.assert_array_equal(first['image'], second['image'])
  split_of = {i: s for s, ids in built_data.ids_by_split(built).items() for i in ids}
  only_part_3 = diffusiondb.build(tmp_path / 'p3', fake.root, parts='3',
                                  **OPTIONS)
  part_3_ids = built_data.ids_by_split(only_part_3)
  assert {i for ids in part_3_ids.values() for i in ids} == {
      i for i in fake.good_ids if i.startswith('part-000003/')}
  for split, ids in part_3_ids.items():
    assert all(split_of[i] == split for i in ids)


def test_parts_selection_and_names(fake, tmp_path):
  builder = diffusiondb.build(tmp_path, fake.root, parts='1,3', **OPTIONS)
  ids = {i for ids in built_data.ids_by_split(builder).values() for i in ids}
  assert {i[:11] for i in ids} == {'part-000001', 'part-000003'}
  assert builder.builder_config.name.startswith('2m_p1+3_32px_crop_png_')
  assert diffusiondb.parse_parts('1,5,7-9') == (1, 5, 7, 8, 9)
  assert diffusiondb.parse_parts(' 3 - 4 ') == (3, 4)
  assert diffusiondb.parse_parts([2, 1]) == (1, 2)
  assert diffusiondb.parse_parts('all') is None
  assert diffusiondb.format_parts([9, 1, 2, 3, 7]) == '1-3+7+9'
  for bad in ('0', '2001', '5-3', 'x'):
    with pytest.raises(ValueError, match='parts='):
      diffusiondb.parse_parts(bad)
  with pytest.raises(FileNotFoundError, match=r'part\(s\).*5-9.*Found: 1-4'):
    diffusiondb.build(tmp_path, fake.root, parts='1-9', **OPTIONS)


def test_config_names_never_collide():
  base = dict(parts='1-2', image_size=64)
  names = {diffusiondb.make_config(**base).name,
           diffusiondb.make_config(**dict(base, parts='1-3')).name,
           diffusiondb.make_config(**dict(base, image_size=32)).name,
           diffusiondb.make_config(**dict(base, resize_mode='keep_aspect')
                                   ).name,
           diffusiondb.make_config(**dict(base, image_format='jpeg')).name,
           diffusiondb.make_config(**dict(base, validation_fraction=0.1)).name,
           diffusiondb.make_config(**dict(base, test_fraction=0.1)).name,
           diffusiondb.make_config(**dict(base, split_seed=1)).name,
           diffusiondb.make_config(**dict(base, dedup=False)).name,
           diffusiondb.make_config(**dict(base, max_image_nsfw=0.5)).name,
           diffusiondb.make_config(**dict(base, max_prompt_nsfw=0.5)).name,
           diffusiondb.make_config(**dict(base, collection='large')).name}
  assert len(names) == 12
  no_filter = diffusiondb.make_config(**dict(base, max_image_nsfw=-1.0))
  assert no_filter.name == diffusiondb.make_config(**base).name
  assert no_filter.max_image_nsfw is None
  long_name = diffusiondb.make_config(parts=list(range(1, 2000, 2))).name
  assert len(long_name) < 100 and long_name.startswith('2m_ph')


def test_nsfw_filters_use_the_metadata_scores(built, fake, tmp_path):
  builder = diffusiondb.build(tmp_path, fake.root, parts='1-3',
                              max_image_nsfw=0.5, max_prompt_nsfw=0.5,
                              **OPTIONS)
  ids = {i for ids in built_data.ids_by_split(builder).values() for i in ids}
  dropped = {fake.notes['image_nsfw_id'], fake.notes['image_nsfw_flagged_id'],
             fake.notes['prompt_nsfw_id']}
  assert ids == set(fake.good_ids) - dropped
  assert fake.notes['unscored_id'] in ids  # A -1 score is unknown: kept.
  skipped = _skipped_ids(_report(builder))
  assert skipped[fake.notes['image_nsfw_flagged_id']] == 'image_nsfw'
  assert skipped[fake.notes['prompt_nsfw_id']] == 'prompt_nsfw'
  assert builder.builder_config.name != built.builder_config.name


def test_nsfw_filter_without_metadata_is_a_clear_error(fake, tmp_path):
  with pytest.raises(FileNotFoundError, match='metadata-large.parquet'):
    diffusiondb.build(tmp_path, fake.root, collection='large',
                      max_image_nsfw=0.5, **OPTIONS)


@pytest.mark.parametrize('mode', ['keep_aspect', 'center_crop'])
def test_both_resize_modes_store_fixed_squares(fake, tmp_path, mode):
  builder = diffusiondb.build(tmp_path, fake.root, parts='3',
                              resize_mode=mode, **OPTIONS)
  for split in builder.info.splits:
    for row in built_data.rows(builder, split):
      assert row['image'].shape == (SIZE, SIZE, 3)
      # 48x40 -> 32x27 padded: two black rows on top in keep_aspect mode.
      assert (not row['image'][:2].any()) == (mode == 'keep_aspect')


def test_large_collection_reads_webp_parts(fake, tmp_path):
  builder = diffusiondb.build(tmp_path, fake.root, collection='large',
                              **OPTIONS)
  ids = {i for ids in built_data.ids_by_split(builder).values() for i in ids}
  assert ids == set(fake.notes['large'].good_ids)
  assert all(i.endswith('.webp') for i in ids)
  assert builder.builder_config.name.startswith('large_p1+10001_')
  assert _report(builder)['total_skipped'] == 0


def test_dedup_off_keeps_the_byte_copy(fake, tmp_path):
  builder = diffusiondb.build(tmp_path, fake.root, parts='1-2', dedup=False,
                              **OPTIONS)
  report = _report(builder)
  assert 'duplicate_image' not in report['skipped_counts']
  kept = {i for ids in built_data.ids_by_split(builder).values() for i in ids}
  assert len(kept - set(fake.good_ids)) == 1


def test_missing_or_empty_manual_dir_is_a_clear_error(tmp_path):
  missing = tmp_path / 'not_downloaded'
  with pytest.raises(FileNotFoundError,
                     match=f'{missing} does not exist.*images/part-000001'):
    diffusiondb.build(tmp_path / 'data', missing, **OPTIONS)
  missing.mkdir()
  (missing / 'README').write_text('hi')
  with pytest.raises(FileNotFoundError, match='looked in.*images'):
    diffusiondb.build(tmp_path / 'data', missing, **OPTIONS)


def test_finished_build_reopens_without_manual_dir_and_detects_damage(
    built, fake, tmp_path):
  data_dir = os.fspath(built.data_dir_root)
  again = diffusiondb.build(data_dir, tmp_path / 'gone', parts='1-4',
                            **OPTIONS)
  assert again.data_path == built.data_path
  copy = tmp_path / 'copy'
  shutil.copytree(data_dir, copy)
  damaged = diffusiondb.build(copy, fake.root, parts='1-4', **OPTIONS)
  os.remove(os.path.join(damaged.data_path, build_common.REPORT_NAME))
  with pytest.raises(build_common.BrokenBuildError, match='build_report'):
    diffusiondb.build(copy, fake.root, parts='1-4', **OPTIONS)


def test_an_interrupted_build_does_not_block_the_next(fake, tmp_path,
                                                      monkeypatch):
  calls = []

  def crash(*args, **kwargs):
    calls.append(1)
    if len(calls) > 3:
      raise RuntimeError('simulated crash')
    return real(*args, **kwargs)

  real = build_common.process_image
  monkeypatch.setattr(build_common, 'process_image', crash)
  with pytest.raises(RuntimeError, match='simulated crash'):
    diffusiondb.build(tmp_path, fake.root, parts='3', **OPTIONS)
  monkeypatch.setattr(build_common, 'process_image', real)
  config = diffusiondb.make_config(parts='3', image_size=SIZE,
                                   validation_fraction=0.25,
                                   test_fraction=0.25)
  variant_parent = tmp_path / 'diffusion_db' / config.name
  assert not (variant_parent / '1.0.0').exists()
  # A killed process leaves its temporary folder behind; it is cleaned up.
  leftover = variant_parent / 'incomplete.KILLED_1.0.0'
  leftover.mkdir(parents=True)
  (leftover / 'junk.array_record').write_bytes(b'x')
  builder = diffusiondb.build(tmp_path, fake.root, parts='3', **OPTIONS)
  assert not leftover.exists()
  assert sum(builder.info.splits[s].num_examples
             for s in builder.info.splits) == 6


def test_cli_prints_the_summary_and_report_path(fake, tmp_path, capsys):
  built_data.run_cli(['build', 'diffusiondb', f'--manual_dir={fake.root}',
           f'--data_dir={tmp_path}', '--parts=3', f'--image_size={SIZE}'])
  out = capsys.readouterr().out
  assert 'examples (train' in out
  report_path = out.strip().splitlines()[-1].split('Report: ')[1]
  with open(report_path) as f:
    assert json.load(f)['parts'] == '3'
  with pytest.raises(ValueError, match="Unknown diffusiondb option.*'size'"):
    build.build_diffusiondb(tmp_path, fake.root, size=3)
