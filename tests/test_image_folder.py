"""Tests for the image-folder builder (prompts.csv or prompts.jsonl)."""

import os

import numpy as np
import pytest

import built_data
import fake_assets
from reverse_sd.data import build
from reverse_sd.data import build_common
from reverse_sd.data import image_folder

SIZE = 32
OPTIONS = dict(image_size=SIZE, validation_fraction=0.3, test_fraction=0.3,
               progress=False)


@pytest.fixture(scope='module')
def kaggle(tmp_path_factory):
  return fake_assets.write_image_folder(tmp_path_factory.mktemp('kaggle'))


@pytest.fixture(scope='module')
def jsonl(tmp_path_factory):
  return fake_assets.write_jsonl(tmp_path_factory.mktemp('jsonl'))


@pytest.fixture(scope='module')
def built_csv(kaggle, tmp_path_factory):
  return image_folder.build(tmp_path_factory.mktemp('data'), kaggle.root,
                            **OPTIONS)


def _all_ids(builder):
  return [i for ids in built_data.ids_by_split(builder).values() for i in ids]


def _check_counts(report, fake):
  assert report['total_examples'] == len(fake.good_ids)
  assert report['items_seen'] == len(fake.good_ids) + len(fake.skipped)
  assert report['total_skipped'] == len(report['skipped']) == sum(
      report['skipped_counts'].values())


def test_csv_folder_builds_with_images_of_any_extension(built_csv, kaggle):
  assert sorted(_all_ids(built_csv)) == sorted(kaggle.good_ids)
  assert set(built_csv.info.splits) == {'train', 'validation', 'test'}
  for split in built_csv.info.splits:
    for row in built_data.rows(built_csv, split):
      assert row['image'].shape == (SIZE, SIZE, 3)
      assert built_data.text(row['prompt']) == kaggle.good_ids[built_data.text(row['id'])]
  assert built_csv.builder_config.name.startswith('prompts-')


def test_csv_report_names_each_skipped_item(built_csv, kaggle):
  report = build_common.read_report(built_csv)
  _check_counts(report, kaggle)
  reasons = {}
  for item in report['skipped']:
    key = ('gone0' if 'gone0' in item['detail'] else
           'blank0' if 'blank0' in item['detail'] else
           os.path.splitext(os.path.basename(item['file']))[0])
    reasons[key] = item['reason']
  assert reasons == kaggle.skipped
  corrupt = [i for i in report['skipped'] if i['reason'] == 'corrupt_image']
  assert corrupt[0]['file'].endswith('images/bad0.png')
  assert 'truncated' in corrupt[0]['detail']
  assert report['prompts_file'].endswith('prompts.csv')


def test_no_prompt_is_in_two_splits(built_csv):
  split_of_prompt = {}
  for split in built_csv.info.splits:
    for row in built_data.rows(built_csv, split):
      prompt = build_common.normalise_prompt(built_data.text(row['prompt']))
      assert split_of_prompt.setdefault(prompt, split) == split, prompt


def test_builds_are_deterministic(built_csv, kaggle, tmp_path):
  again = image_folder.build(tmp_path, kaggle.root, num_workers=2, **OPTIONS)
  assert built_data.ids_by_split(again) == built_data.ids_by_split(built_csv)
  for split in built_csv.info.splits:
    for first, second in zip(built_data.rows(built_csv, split), built_data.rows(again, split)):
      np.testing.assert_array_equal(first['image'], second['image'])


def test_jsonl_list_with_relative_and_absolute_paths(jsonl, tmp_path):
  builder = image_folder.build(tmp_path, jsonl.root, resize_mode='keep_aspect',
                               **OPTIONS)
  assert sorted(_all_ids(builder)) == sorted(jsonl.good_ids)
  report = build_common.read_report(builder)
  _check_counts(report, jsonl)
  found = {}
  for item in report['skipped']:
    name = os.path.basename(item['file'])
    key = name if name.startswith('prompts.jsonl') else (
        os.path.relpath(item['file'], jsonl.root))
    found[key] = item['reason']
  assert found == jsonl.skipped
  for split in builder.info.splits:
    for row in built_data.rows(builder, split):
      assert row['image'].shape == (SIZE, SIZE, 3)
      assert not row['image'][:2].any()  # keep_aspect pads 48x40 with black.


def test_a_changed_list_is_a_new_config(kaggle, tmp_path):
  copy = tmp_path / 'copy'
  copy.mkdir()
  data = (kaggle.root / 'prompts.csv').read_bytes()
  (copy / 'prompts.csv').write_bytes(data)
  same = image_folder.make_config(prompts=copy / 'prompts.csv')
  original = image_folder.make_config(prompts=kaggle.root / 'prompts.csv')
  assert same.name == original.name  # Named by content, not by place.
  (copy / 'prompts.csv').write_bytes(data + b'zzz,one more\r\n')
  changed = image_folder.make_config(prompts=copy / 'prompts.csv')
  assert changed.name != original.name


def test_missing_folder_or_list_is_a_clear_error(tmp_path):
  missing = tmp_path / 'nothing'
  with pytest.raises(FileNotFoundError,
                     match=f'{missing} does not exist.*prompts.csv'):
    image_folder.build(tmp_path / 'data', missing, **OPTIONS)
  missing.mkdir()
  (missing / 'a.png').write_bytes(b'x')
  with pytest.raises(FileNotFoundError,
                     match='neither prompts.csv nor prompts.jsonl'):
    image_folder.build(tmp_path / 'data', missing, **OPTIONS)
  with pytest.raises(FileNotFoundError, match='other.csv does not exist'):
    image_folder.build(tmp_path / 'data', missing, prompts='other.csv',
                       **OPTIONS)
  (missing / 'prompts.csv').write_text('id,text\na,hello\n')
  with pytest.raises(ValueError,
                     match=r"prompts.csv: columns \['imgId', 'prompt'\] are "
                     'missing'):
    image_folder.build(tmp_path / 'data', missing, **OPTIONS)


def test_cli_and_python_entry(kaggle, tmp_path, capsys):
  built_data.run_cli(['build', 'image_folder', f'--manual_dir={kaggle.root}',
           f'--data_dir={tmp_path}', f'--image_size={SIZE}',
           '--prompts=prompts.csv'])
  out = capsys.readouterr().out
  assert f'{len(kaggle.good_ids)} examples' in out
  assert 'skipped corrupt_image: 1' in out
  assert out.strip().endswith(build_common.REPORT_NAME)
  builder = build.build_image_folder(tmp_path, kaggle.root,
                                     image_size=SIZE, progress=False)
  assert len(_all_ids(builder)) == len(kaggle.good_ids)
  with pytest.raises(ValueError, match="Unknown image_folder option.*'parts'"):
    build.build_image_folder(tmp_path, kaggle.root, parts='1')
