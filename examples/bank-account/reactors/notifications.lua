-- A reactor (kind = "reactor"): a side effect per deposit. It "sends" a notification to the
-- account's owner (an e-mail or an HTTP call in a real service; here the message is only
-- built) and records it as sent in bank_notifications.
--
-- A reactor's handle(event) gets no transaction: the record goes through a connection of
-- the reactor's own and commits at once, whatever happens to the processor's batch. The
-- processor moves its checkpoint after handle returns, so a crash between the two delivers
-- the event again (at least once): the event id is the notification's key, so the record
-- stays one row, and a real sender passes it to the mail/HTTP API as its idempotency key.
local dir = debug.getinfo(1, "S").source:match("^@(.*)/reactors/[^/]*$") or "examples/bank-account"
if not package.path:find(dir .. "/?.lua", 1, true) then package.path = dir .. "/?.lua;" .. package.path end
require "account" -- the upcaster: an old deposit arrives in the current shape
local pup = require "pupsourcing"

local db -- the reactor's own connection, opened on first use (one per Lua state)

local function connection()
  if not db then
    local url = os.getenv("DATABASE_URL")
    db = assert(pup.connect(url ~= "" and url or "postgresql://postgres@127.0.0.1:54329/pupsourcing"))
  end
  return db
end

return {
  name = "bank_notifications",
  kind = "reactor",
  aggregate_types = { "Account" },
  event_types = { "MoneyDeposited" },
  -- setup gets the processor's transaction, as a projection's does: the table it needs
  setup = function(tx)
    assert(tx:exec([[CREATE TABLE IF NOT EXISTS bank_notifications (
      event_id text PRIMARY KEY, account_id text NOT NULL, message text NOT NULL,
      sent_at timestamptz NOT NULL DEFAULT now())]]))
  end,
  handle = function(e)
    local message = ("Deposit of %d received (event %d of your account)"):format(e.data.amount, e.aggregate_version)
    -- send(message, {idempotency_key = e.event_id}) would go here
    assert(connection():exec(
      "INSERT INTO bank_notifications (event_id, account_id, message) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING",
      e.event_id, e.aggregate_id, message))
  end,
  -- No reset: `pupsourcing reset` delivers every deposit again, and the records of what
  -- was sent stay (ON CONFLICT keeps them one row each).
}
