"""hold: calls waiting for a human, kept in a store every replica shares (memory or Redis)."""

from .record import CATEGORIES, Approval, ApprovalConflict, ApprovalStore, Grant

__all__ = ["CATEGORIES", "Approval", "ApprovalConflict", "ApprovalStore", "Grant"]
