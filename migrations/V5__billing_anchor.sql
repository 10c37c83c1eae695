-- Per-account billing anchors (issue 15 item 1): the day of the month an
-- account's billing month starts on. A plan's calendar month window
-- (`window: 1mo, calendar: utc`) then runs from that day to the same day
-- of the next month (clamped to the last day of short months) for this
-- account. NULL (and 1): the calendar month, from the 1st.
ALTER TABLE accounts ADD COLUMN billing_anchor smallint
    CHECK (billing_anchor BETWEEN 1 AND 31);
