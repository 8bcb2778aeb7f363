-- `wrote` for the conversations that existed before migration 11. The conv columns of the two
-- tables may differ in collation: the member's side is converted to the messages' one, so
-- the messages index (conv, seq) serves the lookup.
UPDATE conversation_members cm SET cm.wrote = 1 WHERE cm.conv LIKE 'p:%' AND EXISTS (SELECT 1 FROM messages m WHERE m.conv = (CONVERT(cm.conv USING utf8mb4) COLLATE utf8mb4_unicode_ci) AND m.sender_id = cm.user_id);
