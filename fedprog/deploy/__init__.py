"""Deployment at institutions: certificates, audit trail, SuperLink/SuperNode launchers."""

from __future__ import annotations

from fedprog.audit import AuditError, AuditLog, VerifyResult, sha256_arrays, verify

__all__ = ["AuditError", "AuditLog", "VerifyResult", "sha256_arrays", "verify"]
