-- Fails the statement that calls it with `message`: a single statement of
-- data-modifying CTEs (the group create of customers) cannot roll itself
-- back otherwise when a check over what it wrote fails. VOLATILE, so the
-- planner never evaluates it ahead of the CASE that guards it.
CREATE FUNCTION ferry_refuse(message TEXT) RETURNS INTEGER
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION '%', message;
END
$$;
