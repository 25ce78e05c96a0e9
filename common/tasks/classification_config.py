"""Classification's check of its own run-config values (``TaskInfo.config_check``).

Light (no torch, no transformers): ``RunConfig`` runs it for every classification config
it builds, in the coordinator's preflight and at every SuperNode too. The keys are still
``RunConfig`` fields (``TaskInfo.own_keys``: the data layer reads the columns, ``labels``
and ``classes-per-client`` too); set for another task they are refused before this runs.
"""

from __future__ import annotations

from common.config import DP_SGD_ON, ConfigError, RunConfig, check_choice, check_range

# auto: logit-adjusted, unless DP-SGD or class weighting is on (both refuse it).
SKEW_LOSSES = ("auto", "none", "logit-adjusted")
CLASS_WEIGHTINGS = ("none", "inverse-frequency", "effective-number")
CLASS_WEIGHTING_SOURCES = ("site", "global")
AUGMENTS = ("none", "token-dropout", "random-swap", "both")


def check_config(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for a bad classification value of ``cfg``."""
    _check_columns_and_labels(cfg)
    check_range("classes-per-client", cfg.classes_per_client, low=1)
    check_choice("skew-loss", cfg.skew_loss, SKEW_LOSSES)
    check_range("skew-loss-tau", cfg.skew_loss_tau, low=0, low_open=True)
    if cfg.dp_sgd_enabled and cfg.skew_loss == "logit-adjusted":
        raise ConfigError(
            f"`skew-loss` logit-adjusted cannot be combined with {DP_SGD_ON}: the site's "
            "class prior is computed from its records, outside the privacy accounting; "
            "set skew-loss=none or auto")
    _check_imbalance_and_augmentation(cfg)


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


def _check_imbalance_and_augmentation(cfg: RunConfig) -> None:
    check_choice("class-weighting", cfg.class_weighting, CLASS_WEIGHTINGS)
    check_choice("class-weighting-source", cfg.class_weighting_source,
                 CLASS_WEIGHTING_SOURCES)
    check_range("class-weighting-beta", cfg.class_weighting_beta, low=0, high=1,
                low_open=True, high_open=True)
    check_range("focal-gamma", cfg.focal_gamma, low=0)
    check_choice("augment", cfg.augment, AUGMENTS)
    check_range("augment-rate", cfg.augment_rate, low=0, high=1, low_open=True,
                high_open=True)
    if cfg.class_weighting == "none":
        return
    if cfg.skew_loss == "logit-adjusted":
        raise ConfigError(
            f"`class-weighting` {cfg.class_weighting!r} and `skew-loss` {cfg.skew_loss!r} "
            "both correct the loss for the class frequencies; together they correct twice: "
            "set one of them to none (skew-loss auto turns itself off with class "
            "weighting)")
    if cfg.dp_sgd_enabled:
        raise ConfigError(
            f"`class-weighting` {cfg.class_weighting!r} cannot be combined with "
            f"{DP_SGD_ON}: the weights are computed from the records' labels, outside the "
            "privacy accounting; set class-weighting=none (focal-gamma needs no counts and "
            "works with DP-SGD)")
