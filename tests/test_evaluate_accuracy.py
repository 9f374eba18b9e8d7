"""Tests of evaluate.py's accuracy: the accuracy number is the real thing on real data, its epoch is
chosen without the test set, and bad settings are refused in one line."""
import pytest
import torch

import evaluate
from harness import data


def test_classifier_reaches_high_accuracy_on_real_mnist(mnist_dir):
    train_images, train_labels = data.load("mnist", "train", mnist_dir)
    test_images, test_labels = data.load("mnist", "test", mnist_dir)
    result = evaluate.classifier_accuracy(train_images[:3000], train_labels[:3000],
                                            test_images[:2000], test_labels[:2000], epochs=4,
                                            batch_size=32, device="cpu", progress=None)
    assert result["test_accuracy"] > 0.9  # ~0.945 when written; a broken CNN gets ~0.1
    assert result["n_train"] + result["n_val"] == 3000 and result["n_test"] == 2000
    assert 1 <= result["best_epoch"] <= 4


def test_classifier_epoch_choice_ignores_the_test_set_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()  # learnable: brightness
    test_images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=g)
    test_labels = (test_images.float().mean((1, 2, 3)) > 127.5).long()
    run = lambda labels_for_test: evaluate.classifier_accuracy(
        images, labels, test_images, labels_for_test, num_classes=2, epochs=3, seed=5,
        device="cpu", progress=None)
    honest, flipped = run(test_labels), run(1 - test_labels)
    # Same seed -> same training; the test labels must not change which epoch is chosen.
    assert honest["best_epoch"] == flipped["best_epoch"]
    assert honest["val_accuracy"] == flipped["val_accuracy"]
    assert honest["test_accuracy"] == pytest.approx(1 - flipped["test_accuracy"])


def test_classifier_refuses_zero_epochs_in_one_line():
    # With no epoch there is no model to choose: one clear line, not a failed load_state_dict.
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError) as e:
        evaluate.classifier_accuracy(images, torch.arange(4), images, torch.arange(4),
                                       epochs=0, device="cpu", progress=None)
    message = str(e.value)
    assert "\n" not in message and "epochs" in message and "0" in message, message


def test_one_trained_classifier_scores_several_sets_as_classifier_accuracy_does():
    # bench/campaign.py trains once and tests on real training images and on the test set: the
    # parts must give what classifier_accuracy gives, and accuracy must count right answers.
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    whole = evaluate.classifier_accuracy(images, labels, images[:50], labels[:50],
                                           num_classes=2, epochs=2, seed=3, device="cpu")
    model, info = evaluate.train_classifier(images, labels, num_classes=2, epochs=2, seed=3,
                                              device="cpu")
    assert dict(info, test_accuracy=evaluate.accuracy(model, images[:50], labels[:50]),
                n_test=50) == whole
    predicted = model(images[:50].float() / 255).argmax(1)
    wrong = torch.where(torch.arange(50) < 10, 1 - predicted, predicted)  # 10 of 50 wrong
    assert evaluate.accuracy(model, images[:50], wrong) == pytest.approx(0.8)
