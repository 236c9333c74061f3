---@meta pupsourcing
-- LuaLS (lua-language-server) annotations of the public Lua API: completion, hover and type
-- checks for `require "pupsourcing"`. Installed beside the module; point LuaLS at it with
-- `"Lua.workspace.library": ["<prefix>/share/lua/5.4/pupsourcing/types.lua"]`. Definitions
-- only: requiring this file does nothing useful. spec/types_spec.lua checks that every
-- public function of the module has an annotation here, and that none is stale.
-- Reference: docs/lua-api.md. Durations are seconds.
-- luacheck: ignore 241 (the class tables only carry their methods' annotations)

---@class pupsourcing.Error
---@field code string           e.g. "optimistic_concurrency", "connection", "database", "invalid_argument"
---@field message string
---@field sqlstate string?      PostgreSQL's SQLSTATE when the server reported the error
---@field reason any?           store:handle's rejection reason (code "rejected")

---@class pupsourcing.Null: userdata  SQL NULL in rows and parameters

---@class pupsourcing.Expected: userdata  an expected version for append (pup.any, pup.no_stream, pup.exact)

---@class pupsourcing.StoreOptions
---@field events_table string?
---@field aggregate_heads_table string?
---@field checkpoints_table string?

---@class pupsourcing.EventInput
---@field aggregate_type string
---@field aggregate_id string
---@field event_type string
---@field payload string|table      bytes, or a table stored as JSON
---@field metadata (string|table)?
---@field event_id string?          default: a new UUID
---@field event_version integer?    default 1
---@field causation_id string?
---@field correlation_id string?
---@field trace_id string?
---@field created_at string?

---@class pupsourcing.Event
---@field global_position integer
---@field aggregate_type string
---@field aggregate_id string
---@field aggregate_version integer
---@field event_id string
---@field event_type string
---@field event_version integer
---@field payload string            the exact bytes stored
---@field data any                  the JSON payload decoded on first use
---@field metadata string?          JSON text
---@field causation_id string?
---@field correlation_id string?
---@field trace_id string?
---@field created_at string         ISO 8601, UTC

---@class pupsourcing.Stream: pupsourcing.Event[]
---@field version integer           the aggregate's version

---@class pupsourcing.AppendResult
---@field global_positions integer[]
---@field from_version integer
---@field to_version integer
---@field retried true?  the same append again (its event_ids existed): nothing written

---@class pupsourcing.Row: table<string, any>

---@class pupsourcing.AggregateDef
---@field initial fun(): any
---@field evolve fun(state: any, event: pupsourcing.Event): any
---@field snapshot_every integer?
---@field snapshot_version integer?
---@field max_retries integer?
---@field retry_delay number?       seconds

---@class pupsourcing.Names
---@field events_table string
---@field aggregate_heads_table string
---@field checkpoints_table string
---@field workers_table string
---@field groups_table string
---@field sql table<string, string>

---@class pupsourcing.Projection
---@field name string
---@field handle fun(tx: pupsourcing.Tx, event: pupsourcing.Event): any
---@field setup (fun(tx: pupsourcing.Tx))?
---@field reset (fun(tx: pupsourcing.Tx))?
---@field aggregate_types string[]?
---@field event_types string[]?
---@field batch_size integer?

---@class pupsourcing.ProcessorOptions
---@field partition_key integer?
---@field total_partitions integer?
---@field batch_size integer?
---@field poll_interval number?     seconds (default 1)
---@field handler_timeout number?   seconds; none when absent
---@field group boolean?
---@field lease_ttl number?         seconds (default 10)
---@field store pupsourcing.Store?

---@class pupsourcing.ProcessorStats
---@field handled integer
---@field position integer
---@field waiting_position integer?
---@field standby boolean

---@class pupsourcing.RunnerOptions
---@field files string[]
---@field workers integer?
---@field partition_key integer?
---@field total_partitions integer?
---@field batch_size integer?
---@field poll_interval number?     seconds
---@field once boolean?
---@field database_url string?
---@field store pupsourcing.StoreOptions?
---@field log_format "text"|"json"?
---@field handler_timeout number?   seconds
---@field group boolean?
---@field lease_ttl number?         seconds
---@field metrics_addr string?      HOST:PORT

---@class pupsourcing.Limits
---@field batch_size integer
---@field partitions integer
---@field handler_timeout integer   seconds
---@field seconds integer           poll_interval and lease_ttl
---@field name_bytes integer

---@class pupsourcing.JSON
---@field null pupsourcing.Null
---@field array_mt table
local JSON = {}
---@param value any
---@return string
function JSON.encode(value) end
---@param text string
---@return any
function JSON.decode(text) end

---@class pupsourcing.DB
local DB = {}
---@param sql string
---@return integer|nil rows, pupsourcing.Error? err
function DB:exec(sql, ...) end
---@param sql string
---@return pupsourcing.Row[]|nil rows, pupsourcing.Error? err
function DB:query(sql, ...) end
---@return pupsourcing.Tx|nil tx, pupsourcing.Error? err
function DB:begin() end
---@param fn fun(tx: pupsourcing.Tx): ...
---@return any ...
function DB:transaction(fn) end
function DB:close() end

---@class pupsourcing.Tx
local Tx = {}
---@param sql string
---@return integer|true|nil rows, pupsourcing.Error? err
function Tx:exec(sql, ...) end
---@param sql string
---@return pupsourcing.Row[]|nil rows, pupsourcing.Error? err
function Tx:query(sql, ...) end
---@param fn fun(tx: pupsourcing.Tx): ...
---@return any ...
function Tx:savepoint(fn) end
---@return true|nil ok, pupsourcing.Error? err
function Tx:commit() end
---@return true|nil ok, pupsourcing.Error? err
function Tx:rollback() end

---@class pupsourcing.Store
local Store = {}
---@param db pupsourcing.DB|pupsourcing.Tx
---@param expected pupsourcing.Expected
---@param events pupsourcing.EventInput[]
---@return pupsourcing.AppendResult|nil result, pupsourcing.Error? err
function Store:append(db, expected, events) end
---A position to read after, kept by store:read_events (read-only).
---@class pupsourcing.Cursor
---@field position integer  read up to here: resume after it
---@field waiting integer?  the hole it stopped at (an append still in flight), if any

---Gap-safe: never returns an event above a hole that may still fill (docs/ordering.md).
---@param db pupsourcing.DB|pupsourcing.Tx
---@param cursor pupsourcing.Cursor|integer  a cursor, or a position to read after
---@param opts {limit: integer?, aggregate_types: string[]?, event_types: string[]?}?  limit: default 1000
---@return pupsourcing.Event[]|nil events, pupsourcing.Cursor|pupsourcing.Error cursor_or_err
function Store:read_events(db, cursor, opts) end
---Events visible now, holes and all: a reader resuming after the last position seen can skip one.
---@param db pupsourcing.DB|pupsourcing.Tx
---@param from_position integer
---@param limit integer?
---@return pupsourcing.Event[]|nil events, pupsourcing.Error? err
function Store:read_events_raw(db, from_position, limit) end
---Waits for an append's notification on the store's channel, at most `seconds`.
---@param db pupsourcing.DB
---@param seconds number
---@return boolean|nil notified, pupsourcing.Error? err
function Store:wait(db, seconds) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param aggregate_type string
---@param aggregate_id string
---@param range {from_version: integer?, to_version: integer?}?
---@return pupsourcing.Stream|nil stream, pupsourcing.Error? err
function Store:read_aggregate_stream(db, aggregate_type, aggregate_id, range) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@return integer|nil head, pupsourcing.Error? err
function Store:head(db) end
---@param db pupsourcing.DB
---@return true|nil ok, pupsourcing.Error? err
function Store:migrate(db) end
---@return string sql
function Store:schema_sql() end
---@return pupsourcing.Names
function Store:names() end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param aggregate_type string
---@param aggregate_id string
---@param def pupsourcing.AggregateDef
---@return any state, integer|pupsourcing.Error version_or_err
function Store:load(db, aggregate_type, aggregate_id, def) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param aggregate_type string
---@param aggregate_id string
---@param decide fun(state: any, version: integer): (table[]|nil, any)
---@param def pupsourcing.AggregateDef
---@return any state, integer|pupsourcing.Error version_or_err, any result
function Store:handle(db, aggregate_type, aggregate_id, decide, def) end
---Runs projection's handler inside every later append of this store (an inline projection).
---@param db pupsourcing.DB|pupsourcing.Tx
---@param projection pupsourcing.Projection
---@return true|nil ok, pupsourcing.Error? err
function Store:inline(db, projection) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param aggregate_type string
---@param aggregate_id string
---@param snapshot_version integer
---@return pupsourcing.Stream|nil events, string? state_text, integer? version
function Store:read_snapshot_stream(db, aggregate_type, aggregate_id, snapshot_version) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param aggregate_type string
---@param aggregate_id string
---@param version integer
---@param snapshot_version integer
---@param state_text string
---@return boolean|nil written, pupsourcing.Error? err
function Store:write_snapshot(db, aggregate_type, aggregate_id, version, snapshot_version, state_text) end

---@class pupsourcing.Processor
local Processor = {}
---@return integer|nil handled, pupsourcing.Error? err
function Processor:run_once() end
---@param opts {once: boolean?}?
---@return integer|nil handled, pupsourcing.Error? err
function Processor:run(opts) end
---@return pupsourcing.ProcessorStats
function Processor:stats() end
function Processor:close() end

---@class pupsourcing.Runner
local Runner = {}
---@return table<string, {handled: integer, partitions: integer}>|nil results, boolean|pupsourcing.Error interrupted_or_err
function Runner:run() end
function Runner:close() end

---Dead letters of one projection; opts: {position = P?, store = Store?}.
---@class pupsourcing.DeadLetters
local DeadLetters = {}
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param opts {position: integer?, store: pupsourcing.Store?}?
---@return pupsourcing.Row[]|nil rows, pupsourcing.Error? err  in position order
function DeadLetters.list(db, projection, opts) end
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param opts {position: integer?, store: pupsourcing.Store?}?
---@return integer|nil discarded, pupsourcing.Error? err
function DeadLetters.discard(db, projection, opts) end
---Runs the handler again on each dead letter, in order, each with its deletion in one transaction.
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param opts {position: integer?, store: pupsourcing.Store?}?
---@return integer|nil retried, pupsourcing.Error? err, integer? retried_before_the_failure
function DeadLetters.retry(db, projection, opts) end

---@class pupsourcing
---@field version string
---@field null pupsourcing.Null
---@field json pupsourcing.JSON
---@field limits pupsourcing.Limits
---@field error_mt table          the metatable of every error object
---@field projection_fields table<string, true>  the fields a projection table may have
---@field dead_letters pupsourcing.DeadLetters  the events projections gave up on (docs/operations.md)
local pup = {}

---@param url string?  nil: DATABASE_URL, then libpq's defaults
---@return pupsourcing.DB|nil db, pupsourcing.Error? err
function pup.connect(url) end
---@param opts pupsourcing.StoreOptions?
---@return pupsourcing.Store
function pup.store(opts) end
---@return pupsourcing.Expected
function pup.any() end
---@return pupsourcing.Expected
function pup.no_stream() end
---@param version integer
---@return pupsourcing.Expected
function pup.exact(version) end
---@return string uuid
function pup.uuid() end
---@param aggregate_id string
---@param total integer
---@return integer partition
function pup.partition_of(aggregate_id, total) end
---@param s string
---@return integer hash  FNV-1a 32 of the bytes
function pup.fnv1a32(s) end
---@param path string
---@return pupsourcing.Projection
function pup.load_projection(path) end
---@param p table
---@param where string?
---@return pupsourcing.Projection
function pup.check_projection(p, where) end
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param opts pupsourcing.ProcessorOptions?
---@return pupsourcing.Processor
function pup.processor(db, projection, opts) end
---@param opts pupsourcing.RunnerOptions
---@return pupsourcing.Runner|nil runner, pupsourcing.Error? err
function pup.runner(opts) end
---@param db pupsourcing.DB
---@param store pupsourcing.Store?
---@return pupsourcing.Row[]|nil rows, pupsourcing.Error? err
function pup.status(db, store) end
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param store pupsourcing.Store?
---@return integer|nil deleted, pupsourcing.Error? err
function pup.reset(db, projection, store) end
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param count integer
---@param store pupsourcing.Store?
---@return integer|nil before, pupsourcing.Error? err
function pup.repartition(db, projection, count, store) end
---Follows the log from opts.from, calling fn(event) for each event in order, gap-safe;
---stops when fn returns false or after opts.idle_timeout seconds without events.
---@param db pupsourcing.DB
---@param opts {from: pupsourcing.Cursor|integer, store: pupsourcing.Store?, aggregate_types: string[]?, event_types: string[]?, batch_size: integer?, poll_interval: number?, idle_timeout: number?}
---@param fn fun(event: pupsourcing.Event): boolean?
---@return pupsourcing.Cursor|nil cursor, string|pupsourcing.Error reason_or_err, pupsourcing.Cursor? cursor_on_error
function pup.subscribe(db, opts, fn) end
---@param db pupsourcing.DB
---@param store pupsourcing.Store?
---@return pupsourcing.Row[]|nil layouts  projection, mode, total_partitions, previous_mode, previous_total, generation
---@return pupsourcing.Error? err
function pup.layouts(db, store) end
---@param db pupsourcing.DB
---@param projection pupsourcing.Projection
---@param opts {store: pupsourcing.Store?, batch_size: integer?}?
---@return integer|nil handled, pupsourcing.Error? err
function pup.rebuild(db, projection, opts) end
---@param db pupsourcing.DB|pupsourcing.Tx
---@param store pupsourcing.Store?
---@return string|nil warning  nil when global_position defaults to the xid-first function
---@return pupsourcing.Error? err
function pup.position_warning(db, store) end
---@param seconds number
function pup.sleep(seconds) end
---@return number seconds  wall clock
function pup.now() end
---@param argv string[]?
---@return table<string|integer, string|true>
function pup.args(argv) end
---@param code string
---@param message string
---@param sqlstate string?
---@return pupsourcing.Error
function pup.new_error(code, message, sqlstate) end
---@param event_type string
---@param event_version integer
---@param fn fun(data: any, event: pupsourcing.Event): (any, string?, integer?)
function pup.upcast(event_type, event_version, fn) end
---@param event_type string
---@param event_version integer
---@return boolean removed
function pup.remove_upcaster(event_type, event_version) end

---@class pupsourcing.testing.Case
local Case = {}
---@param decide fun(state: any, version: integer): (table[]|nil, any)
---@return pupsourcing.testing.Case
function Case:when(decide) end
---@param expected table[]
---@return pupsourcing.testing.Case
function Case:then_events(expected) end
---@return pupsourcing.testing.Case
function Case:then_nothing() end
---@param expected any?
---@return pupsourcing.testing.Case
function Case:then_rejected(expected) end
---@param pattern string?
---@return pupsourcing.testing.Case
function Case:then_raises(pattern) end
---@param expected any
---@return pupsourcing.testing.Case
function Case:then_state(expected) end

---@class pupsourcing.testing.Spec
local Spec = {}
---@param events table[]
---@return pupsourcing.testing.Case
function Spec:given(events) end

---@class pupsourcing.testing  require "pupsourcing.testing"
---@field Case table
local testing = {}
---@param def pupsourcing.AggregateDef
---@return pupsourcing.testing.Spec
function testing.decider(def) end
---@param v any
---@return string
function testing.show(v) end

return pup
