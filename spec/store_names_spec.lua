-- Issue 11: one home for SQL and derived names. store:names() gives every name the store
-- derives (so no Lua code rebuilds one with gsub) and the operator's statements; scopes
-- are bound as text[] parameters, so type names with quotes, backslashes, commas or
-- braces select exactly their events; repartition is a C function (pup.repartition).
local pup = require "pupsourcing"
local H = require "spec.helpers"

describe("store names and statements", function()
  it("names() gives every derived object, and each exists after migrate", function()
    local db = H.connect()
    assert(db:exec("DROP SCHEMA IF EXISTS pup_names CASCADE"))
    assert(db:exec("CREATE SCHEMA pup_names"))
    local store = pup.store { events_table = "pup_names.ev", aggregate_heads_table = "pup_names.hd",
                              checkpoints_table = "pup_names.cp" }
    assert(store:migrate(db))
    local n = store:names()
    assert.are.same({ "pup_names.ev", "pup_names.hd", "pup_names.cp", "pup_names.cp_workers", "pup_names.cp_groups" },
      { n.events_table, n.aggregate_heads_table, n.checkpoints_table, n.workers_table, n.groups_table })
    assert.are.same({ '"pup_names"."ev"', '"pup_names"."hd"', '"pup_names"."cp"', '"pup_names"."cp_workers"',
                      '"pup_names"."cp_groups"', '"pup_names"."ev_global_position_seq"' },
      { n.events_quoted, n.aggregate_heads_quoted, n.checkpoints_quoted, n.workers_quoted, n.groups_quoted,
        n.sequence_quoted })
    assert.are.equal("pupsourcing.pup_names.ev", n.channel)
    for _, q in ipairs { n.events_quoted, n.aggregate_heads_quoted, n.checkpoints_quoted, n.workers_quoted,
                         n.groups_quoted, n.sequence_quoted } do
      local rows = assert(db:query("SELECT to_regclass($1)::text AS r", q))
      assert.are_not.equal(pup.null, rows[1].r, q .. " does not exist")
    end
    -- The operator's statements run as given.
    assert.are.same({}, assert(db:query(n.sql.status)))
    assert.are.same({}, assert(db:query(n.sql.group_workers)))
    assert.are.equal(0, assert(db:exec(n.sql.reset, "nobody")))
    assert(db:exec("DROP SCHEMA pup_names CASCADE"))
    db:close()
  end)

  it("scopes with quotes, backslashes, commas and braces select exactly their events", function()
    local store, db = H.fresh_store("names_scope")
    local odd = { [[a"b]], [[c\d]], "e,f", "{g}", "h'i", "NULL" }
    for _, t in ipairs(odd) do
      assert(store:append(db, pup.any(), { H.event { aggregate_type = t, aggregate_id = "x", event_type = t } }))
    end
    assert(store:append(db, pup.any(), { H.event { aggregate_type = "other", aggregate_id = "x", event_type = "e" } }))
    local function seen(scope)
      local got = {}
      local p = pup.processor(db, { name = H.uid("scope"), aggregate_types = scope.aggregate_types,
        event_types = scope.event_types, handle = function(_, ev) got[#got + 1] = ev.aggregate_type end },
        { store = store })
      assert(p:run_once())
      p:close()
      return got
    end
    assert.are.same(odd, seen { aggregate_types = odd })
    assert.are.same(odd, seen { event_types = odd })
    assert.are.same({ [[c\d]] }, seen { aggregate_types = { [[c\d]], "other" }, event_types = { [[c\d]] } })
    assert.are.same({ "{g}", "NULL" }, seen { event_types = { "{g}", "NULL" } })
    db:close()
  end)

  it("pup.repartition sets the group count in C and refuses while one settles", function()
    local store, db, names = H.fresh_store("names_repart")
    local proj = { name = "names_repart", handle = function() end }
    assert.are.equal(0, assert(pup.repartition(db, proj, 4, store)))
    assert.are.equal(4, assert(pup.repartition(db, proj, 4, store))) -- unchanged
    local rows = assert(db:query(('SELECT total_partitions, previous_total FROM "%s_groups"'):format(names.checkpoints_table)))
    assert.are.same({ { total_partitions = 4, previous_total = pup.null } }, rows)
    assert.are.equal(4, assert(pup.repartition(db, proj, 2, store)))
    rows = assert(db:query(('SELECT total_partitions, previous_total FROM "%s_groups"'):format(names.checkpoints_table)))
    assert.are.same({ { total_partitions = 2, previous_total = 4 } }, rows)
    local ok, err = pup.repartition(db, proj, 3, store)
    assert.is_nil(ok)
    assert.are.equal("invalid_argument", err.code)
    assert.is_truthy(err.message:find("still settling a repartition from 4 to 2", 1, true), err.message)
    -- Inside a transaction it refuses instead of committing the caller's work.
    local _, terr = db:transaction(function(tx)
      local r, e = pup.repartition(tx, proj, 5, store)
      assert.is_nil(r)
      return nil, e
    end)
    assert.is_truthy(tostring(terr):find("own transaction", 1, true), tostring(terr))
    db:close()
  end)
end)
