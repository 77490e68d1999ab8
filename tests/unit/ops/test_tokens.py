import torch

from ftmods.ops import masked_mean, next_token_targets, segment_ids_from_position_ids


def test_masked_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 8.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(values, mask).item() == 1.5  # (1 + 2) / 2
    assert torch.equal(masked_mean(values, mask, dim=1), torch.tensor([1.5, 0.0]))  # empty row -> 0, not NaN


def test_next_token_targets_shifts_and_pads():
    labels = torch.tensor([[-100, 5, 6], [1, 2, -100]])
    assert torch.equal(next_token_targets(labels), torch.tensor([[5, 6, -100], [2, -100, -100]]))


def test_segment_ids_number_packed_sequences_across_rows():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert torch.equal(segment_ids_from_position_ids(position_ids), torch.tensor([[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]))


def test_segment_ids_row_that_does_not_start_at_zero_is_still_a_new_segment():
    assert torch.equal(segment_ids_from_position_ids(torch.tensor([[3, 4, 0]])), torch.tensor([[0, 0, 1]]))
