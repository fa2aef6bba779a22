"""CategoryMap: ids <-> contiguous labels, ordered by id, and its JSON round trip."""

import numpy as np
import pytest

from retina_jax.data.categories import COCO_2017_IDS, CategoryMap


def test_labels_follow_sorted_ids_whatever_the_file_order():
  cats = CategoryMap.from_coco_categories(
      [{'id': 20, 'name': 'ring'}, {'id': 1, 'name': 'ellipse'}, {'id': 7, 'name': 'triangle'}])
  assert cats.ids == (1, 7, 20)
  assert cats.names == ('ellipse', 'triangle', 'ring')
  np.testing.assert_array_equal(cats.id_to_label([20, 1, 7, 7]), [2, 0, 1, 1])
  np.testing.assert_array_equal(cats.label_to_id(np.array([[2, 0], [1, 1]])), [[20, 1], [7, 7]])


def test_round_trip_and_json():
  cats = CategoryMap(ids=(3, 1, 90), names=('c', 'a', 'z'))
  again = CategoryMap.from_json(cats.to_json())
  assert again == cats
  labels = np.arange(3)
  np.testing.assert_array_equal(again.id_to_label(again.label_to_id(labels)), labels)


def test_errors_name_the_problem():
  cats = CategoryMap(ids=(1, 3), names=('a', 'b'))
  with pytest.raises(KeyError, match='Category id 2'):
    cats.id_to_label([1, 2])
  with pytest.raises(ValueError, match=r'\[0, 2\)'):
    cats.label_to_id([2])
  with pytest.raises(ValueError, match='duplicate'):
    CategoryMap(ids=(1, 1), names=('a', 'b'))
  with pytest.raises(ValueError, match='names'):
    CategoryMap(ids=(1, 2), names=('a',))


def test_coco_2017_map():
  cats = CategoryMap.coco_2017()
  assert cats.num_classes == 80
  assert cats.ids == tuple(sorted(COCO_2017_IDS)) and cats.ids[-1] == 90
  assert set(range(1, 91)) - set(cats.ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
  assert cats.names[0] == 'person' and cats.names[cats.ids.index(90)] == 'toothbrush'
  assert int(cats.label_to_id([79])[0]) == 90
