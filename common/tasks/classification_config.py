"""Classification's own run-config keys of the local loss (``TaskInfo.options``) and
its check of every classification value (``TaskInfo.config_check``).

Light (no torch, no transformers): ``RunConfig`` builds ``ClassificationOptions`` and
runs ``check_config`` for every classification config it builds, in the coordinator's
preflight and at every SuperNode too. The data keys of the task (``labels``, the
columns, ``label-case-fold``, ``classes-per-client``) are still ``RunConfig`` fields
(``TaskInfo.own_keys``: the data layer, the partitioners and the consortium read them);
set for another task they are refused before this runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import DP_SGD_ON, ConfigError, RunConfig, check_choice, check_range

# auto: logit-adjusted, unless DP-SGD or class weighting is on (both refuse it).
SKEW_LOSSES = ("auto", "none", "logit-adjusted")
CLASS_WEIGHTINGS = ("none", "inverse-frequency", "effective-number")
CLASS_WEIGHTING_SOURCES = ("site", "global")
AUGMENTS = ("none", "token-dropout", "random-swap", "both")


@dataclass(frozen=True)
class ClassificationOptions:
    """The loss keys only task classification reads (``skew_loss`` is `skew-loss`), with
    their defaults; ``pyproject.toml`` repeats them (a test checks it).
    ``RunConfig.task_options`` of a classification run."""

    # auto | none | logit-adjusted (common/tasks/classification_losses.py): the site's
    # class prior in the local loss; auto = logit-adjusted unless DP-SGD or class
    # weighting is on (``resolved_skew_loss``)
    skew_loss: str = "auto"
    skew_loss_tau: float = 1.0  # logit-adjusted: weight of the log prior (1 = balanced softmax)
    # none | inverse-frequency | effective-number
    # (common/tasks/classification_losses.py `class_weights`)
    class_weighting: str = "none"
    # site: each site's own label counts | global: the federation's summed counts, which
    # the server sends from round 2 on (round 1 uses the site's)
    class_weighting_source: str = "site"
    class_weighting_beta: float = 0.999  # effective-number: Cui et al.'s usual value
    focal_gamma: float = 0.0  # focal loss exponent (Lin et al. use 2); 0 = cross-entropy
    # none | token-dropout | random-swap | both: training batches only, seeded per step
    augment: str = "none"
    augment_rate: float = 0.1  # share of tokens dropped / swapped (EDA's alpha)


def options_of(cfg: RunConfig) -> ClassificationOptions:
    """The classification keys of ``cfg`` (their defaults for another task's config)."""
    options = cfg.task_options
    return options if isinstance(options, ClassificationOptions) else ClassificationOptions()


def resolved_skew_loss(cfg: RunConfig) -> str:
    """The local loss ``skew-loss`` selects: ``auto`` is logit-adjusted unless DP-SGD
    (the site's prior would be outside the privacy accounting) or class weighting (a
    second correction for the same class frequencies) is on."""
    options = options_of(cfg)
    if options.skew_loss != "auto":
        return options.skew_loss
    if cfg.dp_sgd_enabled or options.class_weighting != "none":
        return "none"
    return "logit-adjusted"


def check_config(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for a bad classification value of ``cfg``."""
    _check_columns_and_labels(cfg)
    check_range("classes-per-client", cfg.classes_per_client, low=1)
    options = options_of(cfg)
    check_choice("skew-loss", options.skew_loss, SKEW_LOSSES)
    check_range("skew-loss-tau", options.skew_loss_tau, low=0, low_open=True)
    if cfg.dp_sgd_enabled and options.skew_loss == "logit-adjusted":
        raise ConfigError(
            f"`skew-loss` logit-adjusted cannot be combined with {DP_SGD_ON}: the site's "
            "class prior is computed from its records, outside the privacy accounting; "
            "set skew-loss=none or auto")
    _check_imbalance_and_augmentation(options, dp_sgd=cfg.dp_sgd_enabled)


def _check_columns_and_labels(cfg: RunConfig) -> None:
    for key, value in (("text-column", cfg.text_column), ("label-column", cfg.label_column)):
        if not value.strip():
            raise ConfigError(f"`{key}` must not be empty")
    if cfg.text_column == cfg.label_column:
        raise ConfigError(f"`text-column` and `label-column` must differ, both are "
                          f"{cfg.text_column!r}")
    if not isinstance(cfg.label_case_fold, bool):
        raise ConfigError(
            f"`label-case-fold` must be true or false, got {cfg.label_case_fold!r}")
    names = cfg.label_list
    if cfg.labels and (len(names) < 2 or len(set(names)) != len(names)):
        raise ConfigError(f"`labels` must name at least 2 distinct classes, got {cfg.labels!r}")


def _check_imbalance_and_augmentation(options: ClassificationOptions, *, dp_sgd: bool) -> None:
    check_choice("class-weighting", options.class_weighting, CLASS_WEIGHTINGS)
    check_choice("class-weighting-source", options.class_weighting_source,
                 CLASS_WEIGHTING_SOURCES)
    check_range("class-weighting-beta", options.class_weighting_beta, low=0, high=1,
                low_open=True, high_open=True)
    check_range("focal-gamma", options.focal_gamma, low=0)
    check_choice("augment", options.augment, AUGMENTS)
    check_range("augment-rate", options.augment_rate, low=0, high=1, low_open=True,
                high_open=True)
    if options.class_weighting == "none":
        return
    if options.skew_loss == "logit-adjusted":
        raise ConfigError(
            f"`class-weighting` {options.class_weighting!r} and `skew-loss` {options.skew_loss!r} "
            "both correct the loss for the class frequencies; together they correct twice: "
            "set one of them to none (skew-loss auto turns itself off with class "
            "weighting)")
    if dp_sgd:
        raise ConfigError(
            f"`class-weighting` {options.class_weighting!r} cannot be combined with "
            f"{DP_SGD_ON}: the weights are computed from the records' labels, outside the "
            "privacy accounting; set class-weighting=none (focal-gamma needs no counts and "
            "works with DP-SGD)")
