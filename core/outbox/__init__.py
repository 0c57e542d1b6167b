"""The outbox: CRM mail composed (:mod:`.compose`), stored with its outbox entry and
delivered exactly once (:mod:`.delivery`) through the user's mailbox or the
default channel (:mod:`.relay`), with the point of no return at the end of SMTP
DATA (:mod:`.smtp_data`) and open providers kept between one-off sends
(:mod:`.pool`)."""
