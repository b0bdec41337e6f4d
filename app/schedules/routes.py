from flask.views import MethodView

from app import runs
from app.flow.schemas import QUOTA_HEADERS, QUOTA_REFUSED
from app.http import Blueprint, current_principal, request_session
from app.schedules import services
from app.schedules.schemas import (
    FireSchema,
    ScheduleCreateSchema,
    SchedulePatchSchema,
    ScheduleSchema,
)

blp = Blueprint("schedules", __name__, url_prefix="/api/v1/schedules", description="Cron schedules")


@blp.route("")
class Schedules(MethodView):
    @blp.doc(operationId="listSchedules")
    @blp.response(200, ScheduleSchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List schedules, newest first"""
        items, total = services.list_schedules(
            request_session(),
            current_principal(),
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return [services.present(item) for item in items]

    @blp.doc(operationId="createSchedule")
    @blp.arguments(ScheduleCreateSchema())
    @blp.response(201, ScheduleSchema())
    @blp.alt_response(409, description="a schedule of that name exists")
    @blp.alt_response(422, description="invalid cron, timezone, target or input")
    def post(self, data):
        """Create a schedule; beat sees it within a second"""
        session = request_session()
        schedule = services.create(session, current_principal(), data)
        session.commit()
        return services.present(schedule)


@blp.route("/<ref>")
class ScheduleByRef(MethodView):
    @blp.doc(operationId="getSchedule")
    @blp.response(200, ScheduleSchema())
    @blp.alt_response(404, description="no such schedule in your organization")
    def get(self, ref):
        """Read a schedule by id or name"""
        return services.present(services.get(request_session(), current_principal(), ref))

    @blp.doc(operationId="updateSchedule")
    @blp.arguments(SchedulePatchSchema())
    @blp.response(200, ScheduleSchema())
    @blp.alt_response(404, description="no such schedule in your organization")
    @blp.alt_response(422, description="invalid cron, timezone, target or input")
    def patch(self, data, ref):
        """Change a schedule; a new cron or timezone counts from now"""
        session = request_session()
        schedule = services.update(session, current_principal(), ref, data)
        session.commit()
        return services.present(schedule)

    @blp.doc(operationId="deleteSchedule")
    @blp.response(204)
    @blp.alt_response(404, description="no such schedule in your organization")
    def delete(self, ref):
        """Delete a schedule and its history; its executions stay"""
        session = request_session()
        services.delete(session, current_principal(), ref)
        session.commit()


@blp.route("/<ref>/pause")
class Pause(MethodView):
    @blp.doc(operationId="pauseSchedule")
    @blp.response(200, ScheduleSchema())
    @blp.alt_response(404, description="no such schedule in your organization")
    def post(self, ref):
        """Pause: nothing fires until resumed; a buffered fire is dropped"""
        session = request_session()
        schedule = services.pause(session, current_principal(), ref)
        session.commit()
        return services.present(schedule)


@blp.route("/<ref>/resume")
class Resume(MethodView):
    @blp.doc(operationId="resumeSchedule")
    @blp.response(200, ScheduleSchema())
    @blp.alt_response(404, description="no such schedule in your organization")
    def post(self, ref):
        """Resume from now (the paused time is not caught up); resets consecutive_failures"""
        session = request_session()
        schedule = services.resume(session, current_principal(), ref)
        session.commit()
        return services.present(schedule)


@blp.route("/<ref>/trigger")
class Trigger(MethodView):
    @blp.doc(operationId="triggerSchedule")
    @blp.response(202, FireSchema())
    @blp.alt_response(404, description="no such schedule in your organization")
    @blp.alt_response(
        409,
        description="the target chain, or the agent of one of its steps, is archived; or the "
        "target agent's concurrency key is full and its on_limit is reject (nothing stored)",
    )
    @blp.alt_response(422, description="the input no longer fits the target")
    @blp.alt_response(429, description=QUOTA_REFUSED, headers=QUOTA_HEADERS)
    def post(self, ref):
        """Fire now, whatever the cron, overlap policy or pause; recorded as kind `manual`

        A chain target starts a chain execution: the answer and the history name it by
        `chain_execution_id` (`execution_id` is then null)."""
        session = request_session()
        entry, launched = services.trigger_now(session, current_principal(), ref)
        session.commit()
        runs.publish_after_commit(launched)
        return entry


@blp.route("/<ref>/history")
class History(MethodView):
    @blp.doc(operationId="listScheduleHistory")
    @blp.response(200, FireSchema(many=True))
    @blp.alt_response(404, description="no such schedule in your organization")
    @blp.paginate()
    def get(self, ref, pagination_parameters):
        """Fire records, newest fire time first: what fired, what was skipped and why"""
        items, total = services.history(
            request_session(),
            current_principal(),
            ref,
            offset=pagination_parameters.first_item,
            limit=pagination_parameters.page_size,
        )
        pagination_parameters.item_count = total
        return items
