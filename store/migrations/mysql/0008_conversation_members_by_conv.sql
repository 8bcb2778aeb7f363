-- The conversation list reads the other party's read position of each two-person
-- conversation (`peer_read_seq`, for receipts): found by conversation, not by user.
CREATE INDEX ix_conv_members_conv ON conversation_members (conv);
